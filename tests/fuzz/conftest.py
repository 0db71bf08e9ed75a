"""Print the schemathesis seed at the end of a run, so any run can be replayed (FUZZ_SEED)."""


def pytest_terminal_summary(terminalreporter):
    from tests.fuzz.test_schemathesis import SEED

    terminalreporter.write_line(f"schemathesis seed {SEED}: replay with FUZZ_SEED={SEED}")
