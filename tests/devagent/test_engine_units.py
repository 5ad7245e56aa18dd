"""Pure rules of the engine: durations, error texts, decoding, templates, delays, status."""

from __future__ import annotations

from typing import Any

import pytest

from nomad_pipeline.devagent import jobspec, scheduler, templates
from nomad_pipeline.devagent.taskrunner import RestartTracker

SECOND = 1_000_000_000


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (100_000_000, "100ms"),
        (1_500_000_000, "1.5s"),
        (5 * SECOND, "5s"),
        (90 * SECOND, "1m30s"),
        (24 * 3600 * SECOND, "24h0m0s"),
        (1500, "1.5µs"),
    ],
)
def test_go_duration_format(ns: int, text: str) -> None:
    assert jobspec.format_duration(ns) == text


def test_multierror_text() -> None:
    assert jobspec.multierror_text(["a"]) == "1 error occurred:\n\t* a\n\n"
    assert jobspec.multierror_text(["a", "b"]) == "2 errors occurred:\n\t* a\n\t* b\n\n"


def test_keys_decode_case_insensitively_and_unknown_fields_drop() -> None:
    decoded = jobspec.canonicalize(
        {
            "id": "j",
            "type": "batch",
            "ReschedulePolicy": {"Attempts": 9},  # not a Job field: Go ignores it
            "taskgroups": [
                {
                    "name": "g",
                    "tasks": [
                        {
                            "name": "t",
                            "driver": "raw_exec",
                            "config": {"Command": "/bin/true"},
                            "env": {"lower": "kept"},
                            "Misspelt": 1,
                        }
                    ],
                }
            ],
        },
        namespace="default",
    )
    assert decoded["ID"] == "j" and decoded["Type"] == "batch"
    assert "ReschedulePolicy" not in decoded
    task = decoded["TaskGroups"][0]["Tasks"][0]
    assert task["Config"] == {"Command": "/bin/true"}  # driver config keys are data
    assert task["Env"] == {"lower": "kept"}
    assert "Misspelt" not in task
    assert decoded["TaskGroups"][0]["ReschedulePolicy"]["Attempts"] == 1  # batch default


def test_defaults_and_job_level_reschedule_merge() -> None:
    job = jobspec.canonicalize(
        {
            "ID": "j",
            "Type": "batch",
            "Reschedule": {"Attempts": 4},
            "TaskGroups": [{"Name": "g", "Tasks": [{"Name": "t", "Driver": "raw_exec"}]}],
        },
        namespace="ci",
    )
    assert (job["Name"], job["Namespace"], job["Priority"], job["Datacenters"]) == (
        "j",
        "ci",
        50,
        ["*"],
    )
    group = job["TaskGroups"][0]
    assert group["Count"] == 1 and group["EphemeralDisk"]["SizeMB"] == 300
    assert group["RestartPolicy"]["Attempts"] == 3
    assert group["ReschedulePolicy"]["Attempts"] == 4
    task = group["Tasks"][0]
    assert task["KillTimeout"] == 5 * SECOND
    assert task["Resources"]["CPU"] == 100 and task["Resources"]["MemoryMB"] == 300
    assert task["LogConfig"] == {"MaxFiles": 10, "MaxFileSizeMB": 10, "Disabled": False}


def test_reschedule_delay_below_five_seconds_is_rejected() -> None:
    job = jobspec.canonicalize(
        {
            "ID": "j",
            "Type": "batch",
            "TaskGroups": [
                {
                    "Name": "g",
                    "ReschedulePolicy": {"Attempts": 1, "Delay": SECOND},
                    "Tasks": [
                        {"Name": "t", "Driver": "raw_exec", "Config": {"command": "/bin/true"}}
                    ],
                }
            ],
        },
        namespace="default",
    )
    [error] = jobspec.validate(job)
    assert "Delay cannot be less than 5s (got 1s)" in error


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("plain", {}, "plain"),
        ('{{ env "A" }}', {"A": "1"}, "1"),
        ('{{ env "MISSING" }}', {}, ""),
        ('a {{- env "A" -}} b', {"A": "x"}, "axb"),
        ('{{ "lit" | toUpper }}', {}, "LIT"),
        ("{{/* note */}}x", {}, "x"),
    ],
)
def test_template_rendering(text: str, env: dict[str, str], expected: str) -> None:
    assert templates.render(text, env) == expected


def test_template_errors_name_the_problem() -> None:
    with pytest.raises(templates.TemplateError, match='function "nomadVarX" not defined'):
        templates.render('{{ nomadVarX "x" }}', {})
    with pytest.raises(templates.TemplateError, match="unclosed action"):
        templates.render("{{ env", {})
    assert templates.parse_env_file("# c\nA=1\nexport B='two'\n") == {"A": "1", "B": "two"}


def failed_alloc(function: str, delays: list[int], *, max_delay: int = 0) -> dict[str, Any]:
    policy = {
        "Attempts": 10,
        "Interval": 3600 * SECOND,
        "Delay": 5 * SECOND,
        "DelayFunction": function,
        "MaxDelay": max_delay,
        "Unlimited": False,
    }
    events = [
        {"RescheduleTime": 1_000 + i, "PrevAllocID": "p", "PrevNodeID": "n", "Delay": d}
        for i, d in enumerate(delays)
    ]
    return {
        "TaskGroup": "g",
        "Job": {"TaskGroups": [{"Name": "g", "ReschedulePolicy": policy}]},
        "RescheduleTracker": {"Events": events} if events else None,
        "TaskStates": None,
        "ModifyTime": 2_000,
    }


@pytest.mark.parametrize(
    ("function", "delays", "expected"),
    [
        ("constant", [], 5 * SECOND),
        ("constant", [5 * SECOND], 5 * SECOND),
        ("exponential", [5 * SECOND], 10 * SECOND),
        ("exponential", [5 * SECOND, 10 * SECOND], 20 * SECOND),
        ("fibonacci", [5 * SECOND], 5 * SECOND),
        ("fibonacci", [5 * SECOND, 5 * SECOND], 10 * SECOND),
        ("fibonacci", [5 * SECOND, 10 * SECOND], 15 * SECOND),
    ],
)
def test_reschedule_delay_functions(function: str, delays: list[int], expected: int) -> None:
    assert scheduler.next_delay(failed_alloc(function, delays)) == expected


def test_reschedule_delay_is_capped_by_max_delay() -> None:
    alloc = failed_alloc("exponential", [40 * SECOND], max_delay=60 * SECOND)
    assert scheduler.next_delay(alloc) == 60 * SECOND


def test_reschedule_attempts_are_counted_within_the_interval() -> None:
    alloc = failed_alloc("constant", [5 * SECOND] * 10)
    assert not scheduler.reschedule_eligible(alloc, now=2_000)
    assert scheduler.reschedule_eligible(alloc, now=3600 * SECOND + 2_000)


@pytest.mark.parametrize(
    ("allocs", "evals", "stop", "status"),
    [
        ([], [], False, "pending"),
        ([("running", "run")], [], False, "running"),
        ([("complete", "run")], ["complete"], False, "dead"),
        ([("failed", "run")], ["complete", "pending"], False, "pending"),
        ([("running", "stop")], ["complete"], True, "dead"),
        ([], ["blocked"], False, "pending"),
    ],
)
def test_job_status_rules(
    allocs: list[tuple[str, str]], evals: list[str], stop: bool, status: str
) -> None:
    job = {"Type": "batch", "Stop": stop}
    alloc_rows = [{"ClientStatus": c, "DesiredStatus": d} for c, d in allocs]
    eval_rows = [{"Status": s} for s in evals]
    assert scheduler.job_status(job, alloc_rows, eval_rows) == status


def test_client_status_from_task_states() -> None:
    def state(name: str, failed: bool = False) -> dict[str, Any]:
        return {"State": name, "Failed": failed}

    assert scheduler.client_status({"a": state("dead", True), "b": state("running")}) == (
        "failed",
        "Failed tasks",
    )
    assert scheduler.client_status({"a": state("running"), "b": state("pending")})[0] == "running"
    assert scheduler.client_status({"a": state("pending")})[0] == "pending"
    assert scheduler.client_status({"a": state("dead")})[0] == "complete"


def test_restart_tracker_policies() -> None:
    policy = {"Attempts": 0, "Interval": SECOND, "Delay": 0, "Mode": "fail"}
    tracker = RestartTracker(policy, "batch", None)
    assert tracker.next(success=True) == ("terminated", 0, "")
    assert tracker.next(success=False) == ("fail", 0, "Policy allows no restarts")
    service = RestartTracker({**policy, "Attempts": 1, "Delay": 10}, "service", None)
    decision, delay, _ = service.next(success=True)
    assert decision == "restart" and 10 <= delay <= 12
    assert service.next(success=False)[0] == "fail"
    delay_mode = RestartTracker(
        {"Attempts": 1, "Interval": 3600 * SECOND, "Delay": 0, "Mode": "delay"}, "batch", None
    )
    assert delay_mode.next(success=False)[0] == "restart"
    decision, wait, reason = delay_mode.next(success=False)
    assert decision == "restart" and wait > 3500 * SECOND
    assert reason == 'Exceeded allowed attempts 1 in interval 1h0m0s and mode is "delay"'
    assert RestartTracker(policy, "batch", {"Hook": "prestart", "Sidecar": True}).next(
        success=True
    ) == ("fail", 0, "Policy allows no restarts")


NODE = {
    "ID": "n1",
    "Name": "dev",
    "Datacenter": "dc1",
    "NodePool": "default",
    "Meta": {"rack": "r1"},
    "Attributes": {"kernel.name": "linux", "cpu.numcores": "8", "nomad.version": "1.9.7"},
}


@pytest.mark.parametrize(
    ("constraint", "met"),
    [
        ({"LTarget": "${attr.kernel.name}", "RTarget": "linux", "Operand": "="}, True),
        ({"LTarget": "${attr.kernel.name}", "RTarget": "windows", "Operand": "="}, False),
        ({"LTarget": "${attr.kernel.name}", "RTarget": "windows", "Operand": "!="}, True),
        ({"LTarget": "${attr.cpu.numcores}", "RTarget": "10", "Operand": "<"}, True),
        ({"LTarget": "${attr.cpu.numcores}", "RTarget": "4", "Operand": ">="}, True),
        ({"LTarget": "${node.datacenter}", "RTarget": "^dc[0-9]$", "Operand": "regexp"}, True),
        ({"LTarget": "${meta.rack}", "Operand": "is_set"}, True),
        ({"LTarget": "${attr.gpu}", "Operand": "is_not_set"}, True),
        ({"LTarget": "${attr.gpu}", "RTarget": "x", "Operand": "="}, False),
        (
            {"LTarget": "${attr.nomad.version}", "RTarget": ">= 1.5, < 2.0", "Operand": "version"},
            True,
        ),
        ({"LTarget": "${attr.nomad.version}", "RTarget": "~> 1.8", "Operand": "version"}, True),
        ({"LTarget": "${attr.nomad.version}", "RTarget": "~> 1.8.0", "Operand": "version"}, False),
        ({"Operand": "distinct_hosts", "RTarget": "true"}, True),
    ],
)
def test_constraints(constraint: dict[str, str], met: bool) -> None:
    assert scheduler.constraint_met(NODE, constraint) is met


def variables_data(env: dict[str, str] | None = None) -> templates.TemplateData:
    store = {"nomad/jobs/app": {"user": "ada", "port": "8080"}, "shared/x": {"k": "v"}}
    return templates.TemplateData(
        env=env or {},
        read_variable=store.get,
        list_variables=lambda prefix: [{"Path": p} for p in sorted(store) if p.startswith(prefix)],
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{{ with nomadVar "nomad/jobs/app" }}{{ .user }}:{{ .port }}{{ end }}', "ada:8080"),
        (
            '{{ range $k, $v := nomadVar "nomad/jobs/app" }}{{ $k }}={{ $v }};{{ end }}',
            "port=8080;user=ada;",
        ),
        ('{{ range nomadVarList "" }}{{ .Path }} {{ end }}', "nomad/jobs/app shared/x "),
        ('{{ if nomadVarExists "missing" }}yes{{ else }}no{{ end }}', "no"),
        ('{{ if eq (env "A") "1" }}x{{ end }}', None),
        ('{{ if eq "1" "1" }}one{{ else if eq "1" "2" }}two{{ else }}none{{ end }}', "one"),
        ('{{ if eq "1" "3" }}one{{ else if eq "1" "1" }}two{{ else }}none{{ end }}', "two"),
        ('{{ with nomadVar "shared/x" }}{{ .absent }}{{ end }}', "<no value>"),
        ('{{ nomadVar "shared/x" | toJSON }}', '{"k":"v"}'),
        ('{{ printf "%s-%d" "a" 3 }}', "a-3"),
        ('{{ $ }}{{ range split "," "a,b" }}[{{ . }}]{{ end }}', "<no value>[a][b]"),
    ],
)
def test_template_control_flow_and_variables(text: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(templates.TemplateError):
            templates.render(text, variables_data({"A": "1"}))
        return
    assert templates.render(text, variables_data()) == expected


def test_missing_variable_blocks_rendering() -> None:
    with pytest.raises(templates.VariableMissing) as caught:
        templates.render('{{ with nomadVar "nomad/jobs/none" }}{{ end }}', variables_data())
    assert caught.value.path == "nomad/jobs/none"
    with pytest.raises(templates.TemplateError, match="if not closed"):
        templates.render("{{ if true }}open", {})
    with pytest.raises(templates.TemplateError, match="unexpected end"):
        templates.render("{{ end }}", {})
