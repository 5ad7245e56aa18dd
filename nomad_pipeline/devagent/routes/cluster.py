"""Status, agent, regions, nodes and namespaces: the cluster as one server + one client node."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from nomad_pipeline.devagent.http import (
    STATE_KEY,
    blocking_query,
    empty_response,
    field,
    json_object,
    json_response,
    paginate,
    query_bool,
    read_json_body,
)
from nomad_pipeline.devagent.state import Change, NomadHTTPError, Obj

RPC_PORT = 4647
SERF_PORT = 4648
NOMAD_VERSION = "1.9.7"
_NAMESPACE_NAME = re.compile(r"^[a-zA-Z0-9-]{1,128}$")
_NON_TERMINAL_ALLOC = ("pending", "running")


@dataclass(slots=True)
class AgentInfo:
    """What ``agent/self`` and ``status/leader`` report; the port is known once bound."""

    bind: str
    http_port: int
    node_name: str
    data_dir: str
    dev_mode: bool
    acl_enabled: bool
    region: str = "global"
    datacenter: str = "dc1"

    @property
    def advertise(self) -> str:
        return "127.0.0.1" if self.bind in ("0.0.0.0", "::", "") else self.bind

    @property
    def rpc_address(self) -> str:
        return f"{self.advertise}:{RPC_PORT}"


AGENT_INFO_KEY: Final = web.AppKey("devagent_agent_info", AgentInfo)


def namespace_object(
    name: str,
    *,
    description: str,
    meta: object,
    capabilities: object,
    create_index: int,
    modify_index: int,
) -> Obj:
    return {
        "Name": name,
        "Description": description,
        "Quota": "",
        "Meta": meta,
        "Capabilities": capabilities,
        "NodePoolConfiguration": {"Default": "", "Allowed": None, "Denied": None},
        "CreateIndex": create_index,
        "ModifyIndex": modify_index,
    }


# -- status and agent -----------------------------------------------------------------------


async def status_leader(request: web.Request) -> web.Response:
    return json_response(request, request.app[AGENT_INFO_KEY].rpc_address)


async def status_peers(request: web.Request) -> web.Response:
    return json_response(request, [request.app[AGENT_INFO_KEY].rpc_address])


def _member(info: AgentInfo) -> Obj:
    return {
        "Name": f"{info.node_name}.{info.region}",
        "Addr": info.advertise,
        "Port": SERF_PORT,
        "Status": "alive",
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
        "Tags": {
            "role": "nomad",
            "region": info.region,
            "dc": info.datacenter,
            "build": NOMAD_VERSION,
            "port": str(RPC_PORT),
            "bootstrap": "1",
            "expect": "1",
            "vsn": "1",
            "raft_vsn": "3",
            "rpc_addr": info.advertise,
            "id": info.node_name,
        },
    }


async def agent_self(request: web.Request) -> web.Response:
    info = request.app[AGENT_INFO_KEY]
    node = _node(request)
    http_address = f"{info.advertise}:{info.http_port}"
    config = {
        "Region": info.region,
        "Datacenter": info.datacenter,
        "NodeName": info.node_name,
        "DataDir": info.data_dir,
        "DevMode": info.dev_mode,
        "BindAddr": info.bind,
        "Addresses": {"HTTP": info.bind, "RPC": info.bind, "Serf": info.bind},
        "AdvertiseAddrs": {
            "HTTP": http_address,
            "RPC": info.rpc_address,
            "Serf": f"{info.advertise}:{SERF_PORT}",
        },
        "Ports": {"HTTP": info.http_port, "RPC": RPC_PORT, "Serf": SERF_PORT},
        "Client": {"Enabled": True, "NodeClass": "", "Options": {"driver.raw_exec.enable": "1"}},
        "Server": {"Enabled": True, "BootstrapExpect": 1},
        "ACL": {"Enabled": info.acl_enabled},
        "TLSConfig": {"EnableHTTP": False, "EnableRPC": False},
        "Version": {
            "Version": NOMAD_VERSION,
            "VersionPrerelease": "",
            "VersionMetadata": "",
            "Revision": "",
            "BuildDate": "",
        },
    }
    stats = {
        "nomad": {
            "server": "true",
            "leader": "true",
            "leader_addr": info.rpc_address,
            "bootstrap": "true",
            "known_regions": "1",
        },
        "client": {
            "node_id": node.get("ID", ""),
            "known_servers": info.rpc_address,
            "num_allocations": str(len(list(request.app[STATE_KEY].rows("allocs")))),
        },
        "runtime": {"arch": "amd64", "version": "go1.22", "kernel.name": "linux"},
    }
    body = {"config": config, "member": _member(info), "stats": stats}
    return json_response(request, body)


async def agent_health(request: web.Request) -> web.Response:
    ok = {"ok": True, "message": "ok"}
    return json_response(request, {"client": ok, "server": ok})


async def agent_members(request: web.Request) -> web.Response:
    info = request.app[AGENT_INFO_KEY]
    body = {
        "ServerName": info.node_name,
        "ServerRegion": info.region,
        "ServerDC": info.datacenter,
        "Members": [_member(info)],
    }
    return json_response(request, body)


async def regions(request: web.Request) -> web.Response:
    return json_response(request, [request.app[AGENT_INFO_KEY].region])


# -- nodes ----------------------------------------------------------------------------------


def _node(request: web.Request) -> Obj:
    return next(iter(request.app[STATE_KEY].rows("nodes")), {})


def node_stub(node: Obj, *, with_attributes: bool, with_resources: bool) -> Obj:
    stub = {
        "ID": node["ID"],
        "Name": node.get("Name", ""),
        "Address": node.get("HTTPAddr", "").rsplit(":", 1)[0],
        "Datacenter": node.get("Datacenter", ""),
        "NodeClass": node.get("NodeClass", ""),
        "NodePool": node.get("NodePool", "default"),
        "Version": (node.get("Attributes") or {}).get("nomad.version", NOMAD_VERSION),
        "Drain": node.get("Drain", False),
        "SchedulingEligibility": node.get("SchedulingEligibility", "eligible"),
        "Status": node.get("Status", "ready"),
        "StatusDescription": node.get("StatusDescription", ""),
        "Drivers": node.get("Drivers"),
        "HostVolumes": node.get("HostVolumes"),
        "NodeResources": node.get("NodeResources") if with_resources else None,
        "ReservedResources": node.get("ReservedResources") if with_resources else None,
        "LastDrain": node.get("LastDrain"),
        "CreateIndex": node.get("CreateIndex", 0),
        "ModifyIndex": node.get("ModifyIndex", 0),
    }
    if with_attributes:
        stub["Attributes"] = node.get("Attributes")
    return stub


async def list_nodes(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    prefix = request.query.get("prefix", "")
    with_attributes = query_bool(request, "os")
    with_resources = query_bool(request, "resources")

    def read() -> tuple[list[Obj], int]:
        nodes = [n for n in state.rows("nodes") if n["ID"].startswith(prefix)]
        return nodes, state.table_index("nodes")

    nodes, index = await blocking_query(request, ("nodes",), read)
    page, headers = paginate(request, nodes, lambda n: str(n["ID"]))
    stubs = [
        node_stub(n, with_attributes=with_attributes, with_resources=with_resources) for n in page
    ]
    return json_response(request, stubs, index=index, headers=headers)


def _find_node(request: web.Request, node_id: str) -> Obj | None:
    state = request.app[STATE_KEY]
    found = state.get("nodes", node_id)
    if found is not None:
        return found
    # Nomad resolves a unique ID prefix for node reads.
    matches = [n for n in state.rows("nodes") if n["ID"].startswith(node_id)] if node_id else []
    return matches[0] if len(matches) == 1 else None


async def node_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    tail = request.match_info["tail"]
    if tail.endswith("/allocations"):
        node_id = tail.removesuffix("/allocations")

        def read_allocs() -> tuple[list[Obj], int]:
            node = _find_node(request, node_id)
            wanted = node["ID"] if node is not None else node_id
            allocs = [a for a in state.rows("allocs") if a.get("NodeID") == wanted]
            newest = max((int(a["ModifyIndex"]) for a in allocs), default=0)
            return sorted(allocs, key=lambda a: a["CreateIndex"]), newest

        allocs, index = await blocking_query(
            request, ("allocs",), read_allocs, reply_index=lambda: state.table_index("allocs")
        )
        return json_response(request, allocs, index=index)
    if "/" in tail:
        raise NomadHTTPError(404, "Invalid URL path")

    def read_node() -> tuple[Obj | None, int]:
        node = _find_node(request, tail)
        return node, node["ModifyIndex"] if node is not None else state.table_index("nodes")

    node, index = await blocking_query(request, ("nodes",), read_node)
    if node is None:
        raise NomadHTTPError(404, "node not found")
    return json_response(request, node, index=index)


# -- namespaces -----------------------------------------------------------------------------


async def list_namespaces(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    prefix = request.query.get("prefix", "")

    def read() -> tuple[list[Obj], int]:
        found = [n for n in state.rows("namespaces") if n["Name"].startswith(prefix)]
        return found, state.table_index("namespaces")

    found, index = await blocking_query(request, ("namespaces",), read)
    page, headers = paginate(request, found, lambda n: str(n["Name"]))
    return json_response(request, page, index=index, headers=headers)


async def namespace_handler(request: web.Request) -> web.Response:
    name = request.match_info.get("name", "")
    if request.method == "GET":
        return await _read_namespace(request, name)
    if request.method in ("PUT", "POST"):
        return await _upsert_namespace(request, name)
    if request.method == "DELETE":
        return await _delete_namespace(request, name)
    raise NomadHTTPError(405, "Invalid method")


async def _read_namespace(request: web.Request, name: str) -> web.Response:
    state = request.app[STATE_KEY]
    if not name:
        raise NomadHTTPError(400, "Missing Namespace Name")

    def read() -> tuple[Obj | None, int]:
        found = state.get("namespaces", name)
        index = found["ModifyIndex"] if found is not None else state.table_index("namespaces")
        return found, index

    found, index = await blocking_query(request, ("namespaces",), read)
    if found is None:
        raise NomadHTTPError(404, "Namespace not found")
    return json_response(request, found, index=index)


async def _upsert_namespace(request: web.Request, path_name: str) -> web.Response:
    state = request.app[STATE_KEY]
    body = json_object(await read_json_body(request), "structs.Namespace")
    name = field(body, "Name") or ""
    if path_name and name and name != path_name:
        raise NomadHTTPError(400, "Namespace name does not match request path")
    name = name or path_name
    if not isinstance(name, str) or not _NAMESPACE_NAME.match(name):
        raise NomadHTTPError(
            500,
            f"1 error occurred:\n\t* invalid name {name!r}. Must match regex "
            f"^[a-zA-Z0-9-]{{1,128}}$\n\n",
        )
    description = field(body, "Description") or ""
    meta = field(body, "Meta")
    capabilities = field(body, "Capabilities")
    current = state.get("namespaces", name)
    index = state.index + 1
    created = current["CreateIndex"] if current is not None else index
    namespace = namespace_object(
        name,
        description=str(description),
        meta=meta,
        capabilities=capabilities,
        create_index=created,
        modify_index=index,
    )
    if current is not None and {**current, "ModifyIndex": index} == namespace:
        # An unchanged upsert is a no-op, as Nomad's state store skips equal namespaces.
        return empty_response(request, current["ModifyIndex"])
    committed = await state.commit([Change("namespaces", name, namespace)])
    return empty_response(request, committed)


async def _delete_namespace(request: web.Request, name: str) -> web.Response:
    state = request.app[STATE_KEY]
    if name == "default":
        raise NomadHTTPError(500, "default namespace can not be deleted")
    if state.get("namespaces", name) is None:
        raise NomadHTTPError(500, f'namespace "{name}" does not exist')
    in_use = (
        (
            "non-terminal jobs",
            any(j["Namespace"] == name and j.get("Status") != "dead" for j in state.rows("jobs")),
        ),
        (
            "non-terminal allocations",
            any(
                a["Namespace"] == name
                and a.get("ClientStatus") in _NON_TERMINAL_ALLOC
                and a.get("DesiredStatus") == "run"
                for a in state.rows("allocs")
            ),
        ),
        ("variables", any(v["Namespace"] == name for v in state.rows("vars"))),
    )
    for what, present in in_use:
        if present:
            raise NomadHTTPError(500, f'namespace "{name}" has {what} in regions: [global]')
    index = await state.commit([Change("namespaces", name, None)])
    return empty_response(request, index)


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/v1/status/leader", status_leader)
    router.add_get("/v1/status/peers", status_peers)
    router.add_get("/v1/agent/self", agent_self)
    router.add_get("/v1/agent/health", agent_health)
    router.add_get("/v1/agent/members", agent_members)
    router.add_get("/v1/regions", regions)
    router.add_get("/v1/nodes", list_nodes)
    router.add_get("/v1/node/{tail:.+}", node_handler)
    router.add_get("/v1/namespaces", list_namespaces)
    router.add_route("*", "/v1/namespace", namespace_handler)
    router.add_route("*", "/v1/namespace/{name}", namespace_handler)
