import sys
sys.path.insert(0, "/work/main/tests/reconcilers")
sys.path.insert(0, "/work/main/tests/e2e")
from pathlib import Path
from run_harness import Stack
from runs_e2e_harness import RAW_EXEC_JOBSPEC
from conftest import stack  # noqa

async def test_dbg(stack: Stack, tmp_path: Path) -> None:
    marker = tmp_path / "attempts"
    flaky = f"n=$(cat {marker} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {marker}; [ $n -ge 2 ]"
    await stack.create_flow("r", {"specification": {"steps": [{"name": "flaky", "retries": 2, "job": {"hcl": RAW_EXEC_JOBSPEC, "variables": {"script": flaky}}}]}})
    run_id = await stack.start_run("r")
    run = await stack.wait_run(run_id)
    print(run.status)
    jobs, _ = await stack.nomad.list_jobs(run_id)
    for j in jobs:
        allocs, _ = await stack.nomad.job_allocations(j["ID"])
        print(j["ID"], j["Status"], [(a["ClientStatus"], a["TaskStates"]["main"]["Events"][-1]) for a in allocs])
    print(marker.read_text())
