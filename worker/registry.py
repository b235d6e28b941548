"""What the control topic says: published adapter versions, each name's active version, who may use
them, and the task routes in force."""

from __future__ import annotations

from dataclasses import dataclass

from lorabus.schemas import AdapterPublish, Job, JobError, RouteSet, parse_adapter_ref
from lorabus.worker.routing import RouteTable, pick_target


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    version: str
    key: str  # the engine's adapter key, "name@version"
    route: RouteSet | None = None  # the route that chose it, if one did


class AdapterRegistry:
    def __init__(self):
        self.versions: dict[str, dict[str, AdapterPublish]] = {}
        self.active: dict[str, str] = {}
        self.routes = RouteTable()

    def publish(self, event: AdapterPublish) -> bool:
        """Record a published version; True when it is the name's first, which makes it active."""
        self.versions.setdefault(event.name, {})[event.version] = event
        if event.name in self.active:
            return False
        self.active[event.name] = event.version
        return True

    def activate(self, name: str, version: str) -> bool:
        """Make a published version the active one; False (nothing changes) when it was never published."""
        if version not in self.versions.get(name, {}):
            return False
        self.active[name] = version
        return True

    def retire(self, name: str, version: str) -> str | None:
        """Forget a published version; None when done, else why not (unknown, or the active version:
        activate another one first, so a name never loses its traffic by accident)."""
        if version not in self.versions.get(name, {}):
            return f"retire {name}@{version}: that version is not published"
        if self.active.get(name) == version:
            return f"retire {name}@{version}: it is the active version; activate another version first"
        del self.versions[name][version]
        return None

    def knows_job(self, job: Job) -> bool:
        """Whether this registry can place the job (False: read the control topic further first)."""
        if job.adapter is not None:
            return self.knows(job.adapter)
        if job.task is not None:
            route = self.routes.find(job.task, job.tenant)
            return route is not None and self.knows(pick_target(route, job.user, job.id).adapter)
        return True

    def resolve_job(self, job: Job) -> ResolvedAdapter | None:
        """The adapter version for a job: its explicit adapter, else its task's route, else the base model
        (None). JobError adapter_not_found (no such version, no route for the task) / forbidden."""
        if job.adapter is not None:
            return self.resolve(job.adapter, job.tenant)
        if job.task is None:
            return None
        route = self.routes.find(job.task, job.tenant)
        if route is None:
            raise JobError("adapter_not_found", f"no route for task {job.task}")
        try:
            resolved = self.resolve(pick_target(route, job.user, job.id).adapter, job.tenant)
        except JobError as err:
            if err.code == "forbidden":  # name the task, not the version the route chose
                raise JobError("forbidden", f"tenant {job.tenant} may not use the adapter routed for task {job.task}")
            raise
        return ResolvedAdapter(resolved.name, resolved.version, resolved.key, route)

    def knows(self, ref_text: str) -> bool:
        ref = parse_adapter_ref(ref_text)
        versions = self.versions.get(ref.name, {})
        return (ref.version or self.active.get(ref.name)) in versions

    def resolve(self, ref_text: str, tenant: str) -> ResolvedAdapter:
        """Name or name@version → the version to serve; JobError adapter_not_found / forbidden."""
        ref = parse_adapter_ref(ref_text)
        version = ref.version or self.active.get(ref.name)
        publish = self.versions.get(ref.name, {}).get(version) if version else None
        if publish is None:
            raise JobError("adapter_not_found", f"adapter {ref_text} is not published")
        if publish.tenants is not None and tenant not in publish.tenants:
            # Name only what the job asked for: the active version is none of this tenant's business.
            raise JobError("forbidden", f"tenant {tenant} may not use adapter {ref_text}")
        return ResolvedAdapter(ref.name, version, f"{ref.name}@{version}")
