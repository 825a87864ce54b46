"""The README's API example runs as written (it is the first code a user copies)."""

from pathlib import Path


def test_the_readme_api_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## The API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(block, "README.md (The API)", "exec"), scope)
    agg, got = scope["agg"], scope["got"]
    assert [type(g).__name__ for g in got] == ["Receipt"] * 3
    stats = agg.stats()
    assert stats["accepted"] == 5 and stats["rejected_total"] == 0 and stats["version"] == 1
