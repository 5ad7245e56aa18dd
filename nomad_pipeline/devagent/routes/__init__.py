"""The dev agent's HTTP routes for the cluster (status, agent, nodes, namespaces) and the
scheduler's objects (jobs, evaluations, allocations). Variables, the client file system and
the event stream have their own modules next to the state they serve."""
