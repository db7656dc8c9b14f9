"""The suite's own configuration (pyproject.toml): what it promises about disk, checked on an inner session."""

import pathlib
import tomllib

pytest_plugins = ["pytester"]


def test_only_failed_tests_keep_their_temporary_directories(pytester):
    """A session writes ~15 GB of run directories: with pyproject's retention settings a passed test's tmp_path
    goes as soon as it passes and a failed one's stays for a look. A made-up pair of tests, one of each."""
    options = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"]
    pytester.makeini("[pytest]\n" + "".join(f"{key} = {options[key]}\n" for key in
                                            ("tmp_path_retention_policy", "tmp_path_retention_count")))
    pytester.makepyfile("""
        def test_passes(tmp_path):
            (tmp_path / "checkpoint.h5").write_bytes(b"x" * 1000)

        def test_fails(tmp_path):
            (tmp_path / "checkpoint.h5").write_bytes(b"x" * 1000)
            assert False
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    left = sorted(p.parent.name for p in pytester.path.rglob("checkpoint.h5"))  # under its --basetemp
    assert left == ["test_fails0"]
