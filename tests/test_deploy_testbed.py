"""The local deployment test bed writes files that fedrg's own settings loaders accept."""

from __future__ import annotations

from fedrg.deploy.settings import load_hospital_settings, load_server_settings
from fedrg.deploy.testbed import write_testbed
from fedrg.secagg.roster import load_roster

EXPERIMENT = """
[federation]
hospitals = 2
rounds = 1
[data]
image_shape = [32, 32]
[model]
public_init = "none"
"""


def test_testbed_files_load_and_agree(tmp_path):
    bed = write_testbed(tmp_path, experiment=EXPERIMENT, hospitals=["h-a", "h-b"], patients=8,
                        seed=1, extra_keys=["outsider"],
                        policy="epsilon_budget = 30.0\nmin_secagg_peers = 1\n",
                        run="timeout_s = 60\nkeep_running = true\n")
    server = load_server_settings(bed.server_toml)
    assert server.superlink.port == bed.port and server.run.keep_running
    assert server.run.timeout_s == 60
    assert [h.name for h in server.auth.hospitals] == ["h-a", "h-b"]  # not the outsider
    assert bed.keys["outsider"].node_public.is_file()
    assert not bed.hospital_toml("outsider").exists()
    roster = load_roster(bed.roster)
    assert sorted(roster.entries) == ["h-a", "h-b"]
    for name in ("h-a", "h-b"):
        site = load_hospital_settings(bed.hospital_toml(name))
        assert site.site.name == name and site.site.roster == str(bed.roster)
        assert site.site.policy.epsilon_budget == 30.0 and site.site.policy.min_secagg_peers == 1
        assert site.server.address == f"127.0.0.1:{bed.port}"
        assert (bed.cohorts[name] / "manifest.csv").is_file()


def test_testbed_without_roster_pins_none(tmp_path):
    bed = write_testbed(tmp_path, experiment=EXPERIMENT, hospitals=["h-a"], patients=8, seed=1,
                        roster=False)
    assert bed.roster is None
    assert load_hospital_settings(bed.hospital_toml("h-a")).site.roster == ""


def test_marked_processes_finds_what_a_run_started_and_nothing_else():
    import os
    import subprocess
    import sys
    import uuid

    from fedrg.deploy.testbed import PROCESS_MARK, marked_processes

    mark = uuid.uuid4().hex
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             env={**os.environ, PROCESS_MARK: mark})
    try:
        assert [p.pid for p in marked_processes(mark)] == [child.pid]
        assert marked_processes(uuid.uuid4().hex) == []  # another mark: nothing
    finally:
        child.kill()
        child.wait()
    assert marked_processes(mark) == []  # gone (and never this process itself)
