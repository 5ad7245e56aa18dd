"""Engine: the task environment, templates, artifacts, lifecycle hooks and logs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

from aiohttp import web
from engine_support import (
    allocs,
    batch_job,
    event_types,
    job_dead,
    running_engine,
    shell_task,
    wait_until,
)

from nomad_pipeline.devagent.state import Change, row_key

DUMP_ENV = "env > $NOMAD_ALLOC_DIR/data/env.txt"


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return dict(pairs)


async def test_environment_meta_and_interpolation(tmp_path: Path) -> None:
    task = shell_task(
        DUMP_ENV,
        Env={
            "ALLOC": "${NOMAD_ALLOC_ID}",
            "FROM_META": "${meta.run_id}",
            "NODE": "${node.unique.name}/${node.datacenter}",
            "KERNEL": "${attr.kernel.name}",
            "UNKNOWN": "${nothing.here}",
        },
        Meta={"Step-Name": "build"},
        Resources={"CPU": 250, "MemoryMB": 64},
    )
    job = batch_job("envjob", tasks=[task], Meta={"run_id": "r1"})
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", job)
        await wait_until(engine, lambda: job_dead(engine, "envjob"))
        [alloc] = allocs(engine, "envjob")
        assert alloc["ClientStatus"] == "complete"
        alloc_dir = engine.alloc_dir(alloc["ID"])
        env = read_env(alloc_dir / "alloc" / "data" / "env.txt")
    assert env["NOMAD_ALLOC_ID"] == alloc["ID"] == env["ALLOC"]
    assert env["NOMAD_SHORT_ALLOC_ID"] == alloc["ID"][:8]
    assert env["NOMAD_ALLOC_NAME"] == "envjob.step[0]" and env["NOMAD_ALLOC_INDEX"] == "0"
    assert env["NOMAD_JOB_ID"] == env["NOMAD_JOB_NAME"] == "envjob"
    assert env["NOMAD_TASK_NAME"] == "main" and env["NOMAD_GROUP_NAME"] == "step"
    assert env["NOMAD_NAMESPACE"] == "default" and env["NOMAD_REGION"] == "global"
    assert env["NOMAD_DC"] == "dc1"
    assert env["NOMAD_CPU_LIMIT"] == "250" and env["NOMAD_MEMORY_LIMIT"] == "64"
    assert env["NOMAD_ALLOC_DIR"] == str(alloc_dir / "alloc")
    assert env["NOMAD_TASK_DIR"] == str(alloc_dir / "main" / "local")
    assert env["NOMAD_SECRETS_DIR"] == str(alloc_dir / "main" / "secrets")
    assert env["NOMAD_META_run_id"] == env["NOMAD_META_RUN_ID"] == "r1"
    assert env["NOMAD_META_Step_Name"] == env["NOMAD_META_STEP_NAME"] == "build"
    assert env["FROM_META"] == "r1"
    assert env["NODE"] == "test-node/dc1"
    assert env["KERNEL"] == "linux"
    assert env["UNKNOWN"] == "${nothing.here}"
    assert "PATH" in env  # the host environment passes through
    for directory in (
        "alloc/data",
        "alloc/logs",
        "alloc/tmp",
        "main/local",
        "main/secrets",
        "main/private",
        "main/tmp",
    ):
        assert (alloc_dir / directory).is_dir(), directory


async def test_templates_render_env_custom_delimiters_and_envvars(tmp_path: Path) -> None:
    task = shell_task(
        "cat local/plain.txt local/alloc.txt > $NOMAD_ALLOC_DIR/data/out.txt; "
        'echo "$FROM_TEMPLATE" >> $NOMAD_ALLOC_DIR/data/out.txt',
        Env={"GREETING": "hello"},
        Templates=[
            {"EmbeddedTmpl": "just text\n", "DestPath": "local/plain.txt"},
            {
                "EmbeddedTmpl": '[[ env "GREETING" | toUpper ]] [[- env "NOMAD_JOB_ID" ]]\n',
                "DestPath": "local/alloc.txt",
                "LeftDelim": "[[",
                "RightDelim": "]]",
            },
            {
                "EmbeddedTmpl": 'FROM_TEMPLATE={{ env "NOMAD_TASK_NAME" }}-x\n',
                "DestPath": "secrets/vars.env",
                "Envvars": True,
            },
        ],
    )
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("tmpl", tasks=[task]))
        await wait_until(engine, lambda: job_dead(engine, "tmpl"))
        [alloc] = allocs(engine, "tmpl")
        assert alloc["ClientStatus"] == "complete", alloc["TaskStates"]
        out = engine.alloc_dir(alloc["ID"]) / "alloc" / "data" / "out.txt"
        assert out.read_text() == "just text\nHELLOtmpl\nmain-x\n"


async def test_template_with_unknown_function_fails_the_task(tmp_path: Path) -> None:
    task = shell_task("exit 0", Templates=[{"EmbeddedTmpl": "{{ nope }}", "DestPath": "local/x"}])
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("badtmpl", tasks=[task]))
        await wait_until(engine, lambda: job_dead(engine, "badtmpl"))
        [alloc] = allocs(engine, "badtmpl")
        assert alloc["ClientStatus"] == "failed"
        hook_failed = alloc["TaskStates"]["main"]["Events"][-2]
        assert hook_failed["Type"] == "Task hook failed"
        assert 'function "nope" not defined' in hook_failed["DisplayMessage"]


def make_git_repo(path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True)

    path.mkdir()
    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (path / "version.txt").write_text("one\n")
    git("add", ".")
    git("commit", "-qm", "one")
    git("tag", "v1")
    (path / "version.txt").write_text("two\n")
    git("commit", "-qam", "two")


async def test_artifacts_git_ref_local_file_and_relative_dest(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    await asyncio.to_thread(make_git_repo, repo)
    plain = tmp_path / "input.txt"
    plain.write_text("data\n")
    task = shell_task(
        "cat local/version.txt local/input.txt > $NOMAD_ALLOC_DIR/data/out.txt; "
        "cat local/head/version.txt >> $NOMAD_ALLOC_DIR/data/out.txt",
        Artifacts=[
            {"GetterSource": f"git::{repo}", "GetterOptions": {"ref": "v1"}},
            {"GetterSource": f"git::file://{repo}", "RelativeDest": "local/head"},
            {"GetterSource": f"file://{plain}"},
        ],
    )
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("art", tasks=[task]))
        await wait_until(engine, lambda: job_dead(engine, "art"))
        [alloc] = allocs(engine, "art")
        assert alloc["ClientStatus"] == "complete", alloc["TaskStates"]
        assert "Downloading Artifacts" in event_types(alloc)
        out = engine.alloc_dir(alloc["ID"]) / "alloc" / "data" / "out.txt"
        assert out.read_text() == "one\ndata\ntwo\n"


async def test_failed_artifact_download_fails_the_task(tmp_path: Path) -> None:
    task = shell_task("exit 0", Artifacts=[{"GetterSource": str(tmp_path / "missing.txt")}])
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("noart", tasks=[task]))
        await wait_until(engine, lambda: job_dead(engine, "noart"))
        [alloc] = allocs(engine, "noart")
        assert alloc["ClientStatus"] == "failed"
        assert event_types(alloc)[-3:] == [
            "Downloading Artifacts",
            "Failed Artifact Download",
            "Not Restarting",
        ]
        failed = alloc["TaskStates"]["main"]["Events"][-2]
        assert "missing.txt" in failed["DownloadError"]


async def test_lifecycle_prestart_main_poststop_and_sidecar(tmp_path: Path) -> None:
    trace = "echo $NOMAD_TASK_NAME >> $NOMAD_ALLOC_DIR/data/trace"
    tasks = [
        shell_task(f"{trace}; exit 0", name="prep", Lifecycle={"Hook": "prestart"}),
        shell_task(
            "echo side >> $NOMAD_ALLOC_DIR/data/side; exec sleep 30",
            name="side",
            Lifecycle={"Hook": "prestart", "Sidecar": True},
        ),
        shell_task(f"test -s $NOMAD_ALLOC_DIR/data/trace && {trace}", name="main"),
        shell_task(f"{trace}", name="cleanup", Lifecycle={"Hook": "poststop"}),
    ]
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("life", tasks=tasks))
        alloc = await wait_until(
            engine,
            lambda: (a := allocs(engine, "life")) and a[0]["ClientStatus"] == "complete" and a[0],
        )
        data = engine.alloc_dir(alloc["ID"]) / "alloc" / "data"
        assert (data / "trace").read_text().split() == ["prep", "main", "cleanup"]
        side = alloc["TaskStates"]["side"]
        assert side["State"] == "dead" and not side["Failed"]
        assert event_types(alloc, "side")[-4:] == [
            "Main Tasks Dead",
            "Killing",
            "Terminated",
            "Killed",
        ]
        assert all(s["State"] == "dead" for s in alloc["TaskStates"].values())


async def test_failed_prestart_keeps_main_from_running(tmp_path: Path) -> None:
    tasks = [
        shell_task("exit 4", name="prep", Lifecycle={"Hook": "prestart"}),
        shell_task("touch $NOMAD_ALLOC_DIR/data/ran", name="main"),
    ]
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("prefail", tasks=tasks))
        await wait_until(engine, lambda: job_dead(engine, "prefail"))
        alloc = await wait_until(
            engine,
            lambda: (
                (a := allocs(engine, "prefail")[0])["ClientStatus"] == "failed"
                and all(s["State"] == "dead" for s in a["TaskStates"].values())
                and a
            ),
        )
        assert alloc["TaskStates"]["prep"]["Failed"]
        assert alloc["TaskStates"]["main"]["StartedAt"] is None
        assert not (engine.alloc_dir(alloc["ID"]) / "alloc" / "data" / "ran").exists()


async def test_logs_rotate_and_wake_followers(tmp_path: Path) -> None:
    task = shell_task(
        "head -c 2500000 /dev/zero | tr '\\0' x",
        LogConfig={"MaxFiles": 2, "MaxFileSizeMB": 1},
    )
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("logs", tasks=[task]))
        alloc = await wait_until(engine, lambda: (a := allocs(engine, "logs")) and a[0])
        waiter = asyncio.create_task(engine.wait_for_log_write(alloc["ID"], 10.0))
        await wait_until(engine, lambda: job_dead(engine, "logs"))
        async with asyncio.timeout(5):
            await waiter
        logs = engine.alloc_dir(alloc["ID"]) / "alloc" / "logs"
        names = sorted(p.name for p in logs.glob("main.stdout.*"))
        assert names == ["main.stdout.1", "main.stdout.2"]
        assert (logs / "main.stdout.1").stat().st_size == 1024 * 1024
        assert (logs / "main.stdout.2").stat().st_size == 2_500_000 - 2 * 1024 * 1024


async def test_wait_for_log_write_times_out_without_output(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await engine.wait_for_log_write("no-such-alloc", 0.05)
        assert loop.time() - started >= 0.05


async def test_raw_exec_config_is_interpolated_and_work_dir_used(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    task = {
        "Name": "main",
        "Driver": "raw_exec",
        "Config": {
            "command": "/bin/sh",
            "args": ["-c", "pwd > ${NOMAD_ALLOC_DIR}/data/pwd; echo $0", "${NOMAD_JOB_ID}"],
            "work_dir": str(work),
        },
    }
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("cfg", tasks=[task]))
        await wait_until(engine, lambda: job_dead(engine, "cfg"))
        [alloc] = allocs(engine, "cfg")
        alloc_dir = engine.alloc_dir(alloc["ID"])
        assert (alloc_dir / "alloc" / "data" / "pwd").read_text().strip() == str(work)
        assert (alloc_dir / "alloc" / "logs" / "main.stdout.0").read_text() == "cfg\n"


async def test_missing_command_is_a_driver_failure(tmp_path: Path) -> None:
    task = {"Name": "main", "Driver": "raw_exec", "Config": {"command": "/no/such/binary"}}
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("nobin", tasks=[task]))
        await wait_until(engine, lambda: job_dead(engine, "nobin"))
        [alloc] = allocs(engine, "nobin")
        assert alloc["ClientStatus"] == "failed"
        assert event_types(alloc)[-2:] == ["Driver Failure", "Not Restarting"]
        assert alloc["TaskStates"]["main"]["Events"][-1]["DisplayMessage"] == (
            "Error was unrecoverable"
        )
        json.dumps(alloc)  # the whole allocation stays JSON-serialisable


async def test_http_artifacts_checksum_and_archive_unpacking(tmp_path: Path) -> None:
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    (bundle_dir / "inside.txt").write_text("unpacked\n")
    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle_dir / "inside.txt", arcname="inside.txt")
    plain = b"served\n"
    bodies = {"/bundle.tar.gz": archive.read_bytes(), "/plain.txt": plain}

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=bodies[request.path])

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    digest = hashlib.sha256(plain).hexdigest()
    task = shell_task(
        "cat local/inside.txt local/files/plain.txt > $NOMAD_ALLOC_DIR/data/out.txt",
        Artifacts=[
            {"GetterSource": f"{base}/bundle.tar.gz"},
            {
                "GetterSource": f"{base}/plain.txt",
                "GetterOptions": {"checksum": f"sha256:{digest}"},
                "RelativeDest": "local/files",
            },
        ],
    )
    bad = shell_task(
        "exit 0",
        name="bad",
        Artifacts=[{"GetterSource": f"{base}/plain.txt?checksum=sha256:{'0' * 64}"}],
    )
    try:
        async with running_engine(tmp_path) as engine:
            await engine.register_job("default", batch_job("http", tasks=[task]))
            await engine.register_job("default", batch_job("httpbad", tasks=[bad]))
            await wait_until(
                engine, lambda: job_dead(engine, "http") and job_dead(engine, "httpbad")
            )
            [alloc] = allocs(engine, "http")
            assert alloc["ClientStatus"] == "complete", alloc["TaskStates"]
            out = engine.alloc_dir(alloc["ID"]) / "alloc" / "data" / "out.txt"
            assert out.read_text() == "unpacked\nserved\n"
            [failed] = allocs(engine, "httpbad")
            download = failed["TaskStates"]["bad"]["Events"][-2]
            assert download["Type"] == "Failed Artifact Download"
            assert "checksums did not match" in download["DisplayMessage"]
    finally:
        await runner.cleanup()


async def test_leader_exit_stops_the_other_tasks(tmp_path: Path) -> None:
    tasks = [
        shell_task("exit 0", name="leader", Leader=True),
        shell_task("exec sleep 30", name="worker"),
    ]
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("lead", tasks=tasks))
        alloc = await wait_until(
            engine,
            lambda: (a := allocs(engine, "lead")) and a[0]["ClientStatus"] == "complete" and a[0],
        )
        assert event_types(alloc, "worker")[-4:] == [
            "Leader Task Dead",
            "Killing",
            "Terminated",
            "Killed",
        ]
        assert not alloc["TaskStates"]["worker"]["Failed"]


async def test_many_concurrent_allocations_all_complete(tmp_path: Path) -> None:
    async with running_engine(tmp_path, persist=True) as engine:
        await asyncio.gather(
            *(
                engine.register_job(
                    "default", batch_job(f"many-{i}", "echo $NOMAD_ALLOC_INDEX", count=2)
                )
                for i in range(40)
            )
        )
        await wait_until(
            engine, lambda: all(job_dead(engine, f"many-{i}") for i in range(40)), timeout=60
        )
        every = [a for i in range(40) for a in allocs(engine, f"many-{i}")]
        assert len(every) == 80
        assert {a["ClientStatus"] for a in every} == {"complete"}
        assert sorted({a["Name"].rsplit(".", 1)[1] for a in every}) == ["step[0]", "step[1]"]
        for alloc in every[:4]:
            log = engine.alloc_dir(alloc["ID"]) / "alloc" / "logs" / "main.stdout.0"
            assert log.read_text() == alloc["Name"][-2] + "\n"


async def test_template_waits_for_a_missing_variable(tmp_path: Path) -> None:
    task = shell_task(
        "cat local/conf > $NOMAD_ALLOC_DIR/data/out.txt",
        Templates=[
            {
                "EmbeddedTmpl": '{{ with nomadVar "nomad/jobs/vjob" }}{{ .token }}{{ end }}\n',
                "DestPath": "local/conf",
            }
        ],
    )
    async with running_engine(tmp_path) as engine:
        await engine.register_job("default", batch_job("vjob", tasks=[task]))
        waiting = await wait_until(
            engine,
            lambda: (
                (a := allocs(engine, "vjob"))
                and a[0]["TaskStates"]
                and "Template" in event_types(a[0])
                and a[0]
            ),
        )
        assert waiting["ClientStatus"] == "pending"
        message = waiting["TaskStates"]["main"]["Events"][-1]["DisplayMessage"]
        assert message == "Missing: nomad.var.block(nomad/jobs/vjob@default.global)"
        index = engine.state.index + 1
        variable = {
            "Namespace": "default",
            "Path": "nomad/jobs/vjob",
            "Items": {"token": "s3cret"},
            "CreateIndex": index,
            "ModifyIndex": index,
        }
        await engine.state.commit([Change("vars", row_key("default", "nomad/jobs/vjob"), variable)])
        await wait_until(engine, lambda: job_dead(engine, "vjob"))
        [alloc] = allocs(engine, "vjob")
        assert alloc["ClientStatus"] == "complete"
        out = engine.alloc_dir(alloc["ID"]) / "alloc" / "data" / "out.txt"
        assert out.read_text() == "s3cret\n"
