"""The soak benchmark's short version (60 s): mixed traffic with node restarts, 500s, hangs,
streams cut mid-way, abandoned streams and bad bodies, then SIGTERM."""

import bench_soak


def test_a_minute_of_faults_loses_no_row_and_leaks_nothing():
    result, problems = bench_soak.main(["--seconds", "60"])
    assert problems == [], result
    assert result["faults"] >= 8 and result["answers"].get("400") and result["answers"].get("abandoned")
