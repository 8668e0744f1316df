"""Code shared by the tests (no tests here): harnesses, fixtures' machinery, wire builders."""
