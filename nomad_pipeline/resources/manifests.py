"""Loading manifests: YAML (multi-document), JSON, the seed's HCL, files, directories and stdin.

Every object is validated completely; errors are ``Invalid`` naming the file, the document (or
the HCL block) and the field, such as
``flow.yaml: document 2: spec.inline.steps[1].run: field required``. ``status`` in a manifest is
ignored (it belongs to the controller), so the output of ``get -o yaml`` can be applied again.

A specification step's jobspec ``path`` is resolved against the manifest's directory, then the
current directory (the seed's examples use paths relative to where its CLI ran); the file's
content is stored in ``job.source`` so the flow does not depend on files on the controller.

In a directory, files ending in .yaml, .yml, .json and .hcl are manifests, except Nomad
jobspecs (``*.nomad.hcl``, ``*.nomad``) and hidden files; ``recursive`` descends into
subdirectories (hidden ones, such as .git, are skipped).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.kinds import VARIABLE_NAME_PATTERN, Flow, SpecificationSpec
from nomad_pipeline.resources.meta import API_VERSION, Resource
from nomad_pipeline.resources.registry import KINDS
from nomad_pipeline.resources.validation import Location, field_path, invalid_from

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json", ".hcl")
JOBSPEC_SUFFIXES = (".nomad.hcl", ".nomad")
STDIN = "<stdin>"


@dataclass(frozen=True, slots=True)
class Manifest:
    """One loaded object, with where it came from (for messages and per-file errors)."""

    obj: Resource
    source: str
    document: int


# ---------------------------------------------------------------------------------------------
# Public API


def load_paths(
    paths: Sequence[Path | str],
    *,
    recursive: bool = False,
    cwd: Path | None = None,
    confine_to: Path | None = None,
) -> list[Manifest]:
    """Load every manifest in ``paths`` (files, directories, or ``-`` for stdin), in order.

    ``confine_to`` refuses jobspec paths that lead outside that directory; GitOps sync passes
    its checkout so a repository cannot make the controller read (and publish) its own files.
    """
    cwd = Path.cwd() if cwd is None else Path(cwd)
    manifests: list[Manifest] = []
    for given in paths:
        if str(given) == "-":
            manifests.extend(
                load_text(sys.stdin.read(), filename=STDIN, cwd=cwd, confine_to=confine_to)
            )
            continue
        path = Path(given)
        full = path if path.is_absolute() else cwd / path
        if full.is_dir():
            for file in _manifest_files(full, recursive):
                shown = str(path / file.relative_to(full))
                manifests.extend(_load_file(file, shown, cwd, confine_to))
        elif full.is_file():
            manifests.extend(_load_file(full, str(path), cwd, confine_to))
        else:
            raise Invalid(f"{given}: no such file or directory", field="filename")
    return manifests


def load_text(
    text: str,
    *,
    filename: str = STDIN,
    base_dir: Path | None = None,
    cwd: Path | None = None,
    confine_to: Path | None = None,
) -> list[Manifest]:
    """Load manifests from ``text``; the format follows ``filename``'s suffix, else the content.

    ``base_dir`` (the manifest's directory) and then ``cwd`` resolve relative jobspec paths;
    ``confine_to`` as in :func:`load_paths`.
    """
    cwd = Path.cwd() if cwd is None else Path(cwd)
    bases = [base for base in (base_dir, cwd) if base is not None]
    if _format(filename, text) == "hcl":
        documents = _hcl_documents(text, filename)
    else:
        documents = _data_documents(text, filename)
    manifests: list[Manifest] = []
    for document, prefix, data, base in documents:
        obj = _parse(data, prefix, base)
        resolve_job_sources(obj, bases=bases, prefix=prefix, base=base, confine_to=confine_to)
        manifests.append(Manifest(obj=obj, source=filename, document=document))
    return manifests


def parse_object(
    data: Any,
    *,
    source: str = "",
    document: int = 1,
    base: Location = (),
    ignore_status: bool = True,
) -> Resource:
    """Validate one object (a dict as decoded from JSON or YAML) into its kind.

    Errors read ``<source>: document <document>: <field>: <problem>``; without a ``source``
    (the API server's bodies) just ``<field>: <problem>``. ``base`` is where the object sits in
    its document (``("items", 2)`` for a List's third item) and prefixes every field path.
    """
    prefix = f"{source}: document {document}" if source else ""
    return _parse(data, prefix, base, ignore_status=ignore_status)


def _parse(data: Any, prefix: str, base: Location, *, ignore_status: bool = True) -> Resource:
    where = field_path(base)
    lead = "".join(f"{part}: " for part in (prefix, where) if part)
    if not isinstance(data, dict):
        raise Invalid(f"{lead}expected an object, got {_type_name(data)}", field=where or None)
    kind_name = data.get("kind")
    known = ", ".join(KINDS)
    kind_field = field_path([*base, "kind"])
    lead = f"{prefix}: " if prefix else ""
    if kind_name is None:
        raise Invalid(f"{lead}{kind_field}: field required (one of {known})", field=kind_field)
    kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
    if kind is None:
        raise Invalid(
            f"{lead}{kind_field}: unknown kind {kind_name!r} (one of {known})", field=kind_field
        )
    body = {key: value for key, value in data.items() if not (ignore_status and key == "status")}
    try:
        return kind.model_validate(body)
    except ValidationError as error:
        raise invalid_from(error, prefix=prefix, base=base) from None


def resolve_job_sources(
    obj: Resource,
    *,
    bases: Sequence[Path],
    prefix: str = "",
    base: Location = (),
    confine_to: Path | None = None,
) -> None:
    """Fill ``job.source`` of every specification step that has a ``path`` and no source yet.

    A relative path is tried against each of ``bases`` in order; the error lists every path
    tried. With ``confine_to``, a path that resolves outside that directory is refused.
    """
    if not isinstance(obj, Flow) or obj.spec.specification is None:
        return
    _load_sources(obj.spec.specification, bases, prefix, base, confine_to)


def _load_sources(
    specification: SpecificationSpec,
    bases: Sequence[Path],
    prefix: str,
    base: Location,
    confine_to: Path | None,
) -> None:
    lead = f"{prefix}: " if prefix else ""
    for index, step in enumerate(specification.steps):
        job = step.job
        if job.path is None or job.source is not None:
            continue
        field = field_path([*base, "spec", "specification", "steps", index, "job", "path"])
        relative = Path(job.path)
        candidates = [relative] if relative.is_absolute() else [root / relative for root in bases]
        if confine_to is not None:
            root = confine_to.resolve()
            outside = [c for c in candidates if not c.resolve().is_relative_to(root)]
            if outside and len(outside) == len(candidates):
                raise Invalid(
                    f"{lead}{field}: jobspec file {job.path!r} is outside {confine_to}",
                    field=field,
                )
            candidates = [c for c in candidates if c not in outside]
        found = next((candidate for candidate in candidates if candidate.is_file()), None)
        if found is None:
            tried = ", ".join(str(candidate) for candidate in candidates) or job.path
            raise Invalid(
                f"{lead}{field}: jobspec file {job.path!r} not found (tried {tried})", field=field
            )
        try:
            job.source = found.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise Invalid(f"{lead}{field}: cannot read {found}: {error}", field=field) from None


# ---------------------------------------------------------------------------------------------
# Files and formats


def _manifest_files(directory: Path, recursive: bool) -> list[Path]:
    found: list[Path] = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if recursive:
                found.extend(_manifest_files(entry, recursive))
        elif entry.name.endswith(MANIFEST_SUFFIXES) and not entry.name.endswith(JOBSPEC_SUFFIXES):
            found.append(entry)
    return found


def _load_file(path: Path, shown: str, cwd: Path, confine_to: Path | None) -> list[Manifest]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise Invalid(f"{shown}: cannot read: {error}", field="filename") from None
    return load_text(text, filename=shown, base_dir=path.parent, cwd=cwd, confine_to=confine_to)


# Seed HCL starts (after comments) with a namespace, flow or trigger block.
_HCL_START = re.compile(r"^(?:\s*(?:#|//)[^\n]*\n|\s+)*(?:namespace|flow|trigger)\b[^\n:=]*\{")


def _format(filename: str, text: str) -> str:
    lowered = filename.lower()
    if lowered.endswith(".hcl"):
        return "hcl"
    if lowered.endswith(".json"):
        return "json"
    if lowered.endswith((".yaml", ".yml")):
        return "yaml"
    return "hcl" if _HCL_START.match(text) else "yaml"


# (document number, error prefix, object, field location of the object inside its document)
_Document = tuple[int, str, Any, Location]


def _data_documents(text: str, filename: str) -> Iterator[_Document]:
    """YAML (which also reads JSON) documents, each unwrapped into its objects."""
    if _format(filename, text) == "json":
        try:
            documents: list[Any] = [json.loads(text)]
        except json.JSONDecodeError as error:
            raise Invalid(f"{filename}: invalid JSON: {error}", field="filename") from None
    else:
        documents = _yaml_documents(text, filename)
    for number, document in enumerate(documents, start=1):
        prefix = f"{filename}: document {number}"
        for data, base in _objects_in(document, prefix):
            yield number, prefix, data, base


def _yaml_documents(text: str, filename: str) -> list[Any]:
    documents: list[Any] = []
    try:
        for document in yaml.load_all(text, Loader=_StrictLoader):
            documents.append(document)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise Invalid(
            f"{filename}: document {len(documents) + 1}: invalid YAML at {where}{error.problem}",
            field="filename",
        ) from None
    except yaml.YAMLError as error:
        raise Invalid(f"{filename}: invalid YAML: {error}", field="filename") from None
    return documents


def _objects_in(document: Any, prefix: str) -> Iterator[tuple[Any, Location]]:
    """A document holds one object, a list of objects, or a ``List`` with ``items``."""
    if document is None:
        return
    if isinstance(document, list):
        for index, item in enumerate(document):
            yield item, (index,)
        return
    if (
        isinstance(document, dict)
        and "items" in document
        and document.get("kind", "List")
        in (
            "List",
            None,
        )
    ):
        extra = set(document) - {"apiVersion", "kind", "items", "metadata"}
        if extra:
            raise Invalid(f"{prefix}: {sorted(extra)[0]}: unknown field", field=sorted(extra)[0])
        items = document["items"]
        if not isinstance(items, list):
            raise Invalid(f"{prefix}: items: expected a list", field="items")
        for index, item in enumerate(items):
            yield item, ("items", index)
        return
    yield document, ()


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool):
            continue  # construct_mapping reports unhashable keys itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)


def _type_name(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------
# The seed's HCL format

_BLOCK_MARK = "__is_block__"
# Block types in the order they are applied: a flow's namespace must exist before the flow.
_HCL_KINDS = ("namespace", "flow", "trigger")


def _hcl_documents(text: str, filename: str) -> Iterator[_Document]:
    # python-hcl2 and lark take ~0.1 s to import: only HCL manifests pay for them.
    import hcl2

    options = hcl2.SerializationOptions(
        with_comments=False,
        explicit_blocks=True,
        preserve_heredocs=False,
        strip_string_quotes=True,
    )
    try:
        parsed = hcl2.loads(text, serialization_options=options)
    except Exception as error:  # python-hcl2 raises lark's errors, which carry line and column
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise Invalid(f"{filename}: invalid HCL: {first_line}", field="filename") from None
    unknown = sorted(set(parsed) - set(_HCL_KINDS))
    if unknown:
        raise Invalid(
            f"{filename}: unknown block {unknown[0]!r} (expected namespace, flow or trigger; "
            "Nomad jobspecs are referenced from a flow, not applied)",
            field="filename",
        )
    number = 0
    for block_type in _HCL_KINDS:
        for label, body in _blocks(parsed.get(block_type), f"{filename}: {block_type}"):
            number += 1
            prefix = f"{filename}: {block_type}" + (f' "{label}"' if label else "")
            if block_type == "namespace":
                data = _hcl_namespace(label, _Block(body, prefix))
            elif block_type == "flow":
                data = _hcl_flow(label, _Block(body, prefix))
            else:
                data = _hcl_trigger(label, _Block(body, prefix))
            yield number, prefix, data, ()


def _blocks(value: Any, where: str) -> list[tuple[str | None, dict[str, Any]]]:
    """``[(label or None, body)]`` of a block list as python-hcl2 serialises it."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(f"{where}: expected a block, got an attribute", field="filename")
    found: list[tuple[str | None, dict[str, Any]]] = []
    for item in value:
        if not isinstance(item, dict):
            raise Invalid(f"{where}: expected a block", field="filename")
        if item.get(_BLOCK_MARK):
            found.append((None, item))
        elif len(item) == 1:
            label, body = next(iter(item.items()))
            if not isinstance(body, dict) or not body.get(_BLOCK_MARK):
                raise Invalid(f"{where}: expected a block", field="filename")
            found.append((label, body))
        else:
            raise Invalid(f"{where}: expected a block", field="filename")
    return found


def _is_block(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    if item.get(_BLOCK_MARK):
        return True
    if len(item) != 1:
        return False
    body = next(iter(item.values()))
    return isinstance(body, dict) and bool(body.get(_BLOCK_MARK))


class _Block:
    """One HCL block body; every attribute must be taken, leftovers are reported as unknown."""

    def __init__(self, body: dict[str, Any], where: str) -> None:
        self.body = {key: value for key, value in body.items() if key != _BLOCK_MARK}
        self.where = where

    def take(self, key: str, default: Any = None) -> Any:
        value = self.body.pop(key, default)
        if isinstance(value, list) and value and all(_is_block(item) for item in value):
            raise self.error(f"{key!r} must be an attribute ({key} = ...), not a block")
        return value

    def take_into(self, target: dict[str, Any], *keys: str) -> None:
        for key in keys:
            if key in self.body:
                target[key] = self.take(key)

    def labeled(self, key: str) -> list[tuple[str, dict[str, Any]]]:
        found: list[tuple[str, dict[str, Any]]] = []
        for label, body in _blocks(self.body.pop(key, None), f"{self.where}: {key}"):
            if label is None:
                raise self.error(f'{key} blocks need a label ({key} "<id>" {{ ... }})')
            found.append((label, body))
        return found

    def single(self, key: str, *, required: bool = False) -> _Block | None:
        blocks = _blocks(self.body.pop(key, None), f"{self.where}: {key}")
        if not blocks:
            if required:
                raise self.error(f"a {key} block is required")
            return None
        if len(blocks) > 1:
            raise self.error(f"only one {key} block is allowed")
        label, body = blocks[0]
        if label is not None:
            raise self.error(f"a {key} block takes no label")
        return _Block(body, f"{self.where}: {key}")

    def error(self, message: str) -> Invalid:
        return Invalid(f"{self.where}: {message}", field="filename")

    def finish(self) -> None:
        if self.body:
            name = sorted(self.body)[0]
            raise self.error(f"unknown attribute or block {name!r}")


def _envelope(kind: str, name: str | None, namespace: Any, spec: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec}


def _hcl_namespace(label: str | None, block: _Block) -> dict[str, Any]:
    name = block.take("id", label)
    if name is None:
        raise block.error("id is required")
    spec: dict[str, Any] = {}
    block.take_into(spec, "description")
    block.finish()
    return _envelope("Namespace", name, None, spec)


_HCL_TYPES = {"set": "list", "tuple": "list"}


def _hcl_type(value: Any) -> Any:
    """``string`` → string; ``list(string)`` (serialised as ``${list(string)}``) → list."""
    if not isinstance(value, str):
        return value
    text = value.removeprefix("${").removesuffix("}").strip()
    base = text.split("(", 1)[0].strip()
    return _HCL_TYPES.get(base, base)


def _hcl_flow(label: str | None, block: _Block) -> dict[str, Any]:
    if label is None:
        raise block.error('a flow needs a label (flow "<id>" { ... })')
    namespace = block.take("namespace", "default")
    spec: dict[str, Any] = {}
    variables = []
    for name, body in block.labeled("variable"):
        variable_block = _Block(body, f'{block.where}: variable "{name}"')
        variable: dict[str, Any] = {"name": name}
        if "type" in variable_block.body:
            variable["type"] = _hcl_type(variable_block.take("type"))
        variable_block.take_into(variable, "required", "default", "description")
        variable_block.finish()
        variables.append(variable)
    if variables:
        spec["variables"] = variables
    inline_blocks = block.labeled("inline")
    if len(inline_blocks) > 1:
        raise block.error("only one inline block is allowed")
    for job_id, body in inline_blocks:
        spec["inline"] = _hcl_inline(job_id, _Block(body, f'{block.where}: inline "{job_id}"'))
    specification = [
        _hcl_specification(step_id, _Block(body, f'{block.where}: specification "{step_id}"'))
        for step_id, body in block.labeled("specification")
    ]
    if specification:
        spec["specification"] = {"steps": specification}
    block.take_into(spec, "timeout")
    block.finish()
    return _envelope("Flow", label, namespace, spec)


_STEP_EXTRAS = ("condition", "needs", "timeout", "retries")


def _hcl_inline(job_id: str, block: _Block) -> dict[str, Any]:
    inline: dict[str, Any] = {"job_id": job_id}
    runner_block = block.single("runner", required=True)
    assert runner_block is not None  # required=True raised otherwise
    on_demand = runner_block.single("nomad_on_demand", required=True)
    assert on_demand is not None
    runner_block.finish()
    runner: dict[str, Any] = {}
    on_demand.take_into(runner, "namespace", "image")
    # The seed's on-demand runner is a docker container; `driver` may say otherwise.
    runner["driver"] = on_demand.take("driver", "docker" if runner.get("image") else "raw_exec")
    artifacts = []
    for _, body in _blocks(on_demand.body.pop("artifact", None), f"{on_demand.where}: artifact"):
        artifact_block = _Block(body, f"{on_demand.where}: artifact")
        artifact: dict[str, Any] = {}
        artifact_block.take_into(artifact, "source", "destination", "options")
        artifact_block.finish()
        artifacts.append(artifact)
    if artifacts:
        runner["artifacts"] = artifacts
    resource_block = on_demand.single("resource")
    if resource_block is not None:
        resources: dict[str, Any] = {}
        resource_block.take_into(resources, "cpu", "memory")
        resource_block.finish()
        runner["resources"] = resources
    on_demand.finish()
    inline["runner"] = runner
    steps = []
    for step_id, body in block.labeled("step"):
        step_block = _Block(body, f'{block.where}: step "{step_id}"')
        step: dict[str, Any] = {"name": step_id}
        step_block.take_into(step, "run", "env", *_STEP_EXTRAS)
        step_block.finish()
        steps.append(step)
    inline["steps"] = steps
    block.finish()
    return inline


def _hcl_specification(step_id: str, block: _Block) -> dict[str, Any]:
    step: dict[str, Any] = {"name": step_id}
    block.take_into(step, *_STEP_EXTRAS)
    job_block = block.single("job", required=True)
    assert job_block is not None
    job: dict[str, Any] = {}
    job_block.take_into(job, "path", "hcl", "json", "name_format")
    variables = job_block.take("variables")
    if variables is not None:
        if not isinstance(variables, dict):
            raise job_block.error("variables must be a map of jobspec variable = flow variable")
        # The seed's values name a flow variable; ours are templates. A value that is already
        # a template is kept.
        job["variables"] = {
            key: f"${{var.{value}}}"
            if isinstance(value, str) and VARIABLE_NAME_PATTERN.match(value)
            else value
            for key, value in variables.items()
        }
    job_block.finish()
    step["job"] = job
    block.finish()
    return step


def _hcl_trigger(label: str | None, block: _Block) -> dict[str, Any]:
    if label is None:
        raise block.error('a trigger needs a label (trigger "<id>" { ... })')
    namespace = block.take("namespace", "default")
    spec: dict[str, Any] = {}
    block.take_into(spec, "flow", "variables", "suspend")
    sources = block.labeled("source")
    if len(sources) != 1:
        raise block.error(f"exactly one source block is required (found {len(sources)})")
    source_id, body = sources[0]
    source_block = _Block(body, f'{block.where}: source "{source_id}"')
    provider = source_block.take("provider")
    config = source_block.single("config", required=True)
    assert config is not None
    source_block.finish()
    if provider == "cron":
        cron: dict[str, Any] = {}
        if "crons" in config.body:
            cron["schedules"] = config.take("crons")
        config.take_into(cron, "timezone", "concurrency_policy", "starting_deadline")
        spec["source"] = {"cron": cron}
    elif provider == "git-webhook":
        webhook: dict[str, Any] = {}
        config.take_into(webhook, "provider", "repository", "events", "branches", "paths")
        secret = config.take("secret")
        if isinstance(secret, str):
            raise config.error(
                "secret: literal secrets are not stored in objects; use "
                'secret = { from_env = "GITHUB_WEBHOOK_SECRET" } or '
                'secret = { from_nomad_variable = { path = "...", key = "..." } }'
            )
        if secret is not None:
            webhook["secret"] = secret
        spec["source"] = {"webhook": webhook}
    elif provider == "git":
        git: dict[str, Any] = {}
        config.take_into(git, "url", "branch", "interval")
        spec["source"] = {"git": git}
    else:
        raise source_block.error(
            f"unknown provider {provider!r} (expected cron, git-webhook or git)"
        )
    config.finish()
    block.finish()
    return _envelope("Trigger", label, namespace, spec)
