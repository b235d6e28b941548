"""Which adapter version serves a job on this worker: the control log's state (worker/control_log.py)
read through what has loaded here (`AdapterHealth`).

Safe activation lives here. A version takes traffic by name or by route only once it has loaded on
this worker: until then the name keeps its previous version and the task its previous route, and a
version that fails to load never takes that traffic (the failure stays visible in status). A job
that asks for an exact version gets that version, waiting for its load or answered
adapter_load_failed.

A job may ask for a weighted mix of adapters instead of one: each member resolves as a job naming it
would (its serving version, or the exact version asked), the tenant must be allowed every member, and
the mix is served under its canonical key (scheduler `mix_key`), built by the engine from the members.
A route's target may be such a mix of exact versions: it counts as loaded once every member has loaded,
and its jobs are served as that mix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable

from lorabus.scheduler import MIX_PREFIX, mix_key
from lorabus.schemas import AdapterPublish, Job, JobError, MixMember, RouteSet, RouteTarget, parse_adapter_ref
from lorabus.worker.control_log import ControlLog, RouteKey
from lorabus.worker.routing import pick_target


class Load(Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class AdapterHealth:
    """This worker's loads: which versions have loaded, are loading, or failed and why ("name@version" keys).
    Change states only through `set` and `forget`: they keep `loading` and tell the watchers."""

    def __init__(self):
        self.states: dict[str, Load] = {}
        self.reasons: dict[str, str] = {}
        self.sources: dict[str, str] = {}  # where each version's last load came from (VersionStatus.source)
        self.loading: set[str] = set()  # the keys in state LOADING (asked often: never a scan of every state)
        self._watchers: list[Callable[[str], None]] = []

    def watch(self, on_change: Callable[[str], None]) -> None:
        """Be told of every key whose state changes."""
        self._watchers.append(on_change)

    def state(self, key: str) -> Load | None:
        return self.states.get(key)

    def set(self, key: str, state: Load, reason: str | None = None) -> bool:
        """Record a load state; True when it changed."""
        changed = self.states.get(key) is not state or self.reasons.get(key) != reason
        self.states[key] = state
        if reason is None:
            self.reasons.pop(key, None)
        else:
            self.reasons[key] = reason
        if state is Load.LOADING:
            self.loading.add(key)
        else:
            self.loading.discard(key)
        if changed:
            self._tell(key)
        return changed

    def forget(self, key: str) -> None:
        known = self.states.pop(key, None) is not None
        self.reasons.pop(key, None)
        self.sources.pop(key, None)
        self.loading.discard(key)
        if known:
            self._tell(key)

    def _tell(self, key: str) -> None:
        for on_change in self._watchers:
            on_change(key)

    def failure(self, key: str) -> str | None:
        return self.reasons.get(key) if self.states.get(key) is Load.FAILED else None


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    version: str
    key: str  # the engine's adapter key, "name@version" (a mix: its canonical mix key)
    route: RouteSet | None = None  # the route that chose it, if one did
    mix: tuple[tuple["ResolvedAdapter", float], ...] = ()  # a mix: each member and its weight, in the job's order


def is_mix_key(key: str) -> bool:
    return key.startswith(MIX_PREFIX)


def adapter_key(name: str, version: str) -> str:
    return f"{name}@{version}"


class AdapterRegistry:
    """What serves, read from the control log and this worker's loads. The versions to load next
    (`to_load`) are kept per name and per route key and re-derived only for those a control event or a
    load changed since the last call (both tell the registry: `ControlLog.watch`, `AdapterHealth.watch`),
    so a burst of N loads at start-up costs O(N), not O(N) per load."""

    def __init__(self, log: ControlLog, health: AdapterHealth):
        self.log, self.health = log, health
        self._wanted_by_name: dict[str, str] = {}  # name → its next version to load, if any
        self._wanted_by_route: dict[RouteKey, list[str]] = {}  # route key → the versions its routes want
        self._wanted_peak = 0  # the most entries the two held since they were last copied (_compact_wanted)
        self._stale_names: set[str] = set(log.names())  # names whose wanted version may have changed
        self._stale_routes: set[RouteKey] = set(log.route_keys())
        self._names_of_route: dict[RouteKey, set[str]] = {}  # the names a route key's routes go through
        self._routes_through: dict[str, set[RouteKey]] = {}  # ... and back: a name's change is its routes' too
        log.watch(self._name_changed, self._stale_routes.add)
        health.watch(self._version_changed)

    def _name_changed(self, name: str) -> None:
        self._stale_names.add(name)
        self._stale_routes.update(self._routes_through.get(name, ()))

    def _version_changed(self, key: str) -> None:
        self._name_changed(key.partition("@")[0])

    # ---- what serves ------------------------------------------------------------------------------

    def serving(self, name: str) -> str | None:
        """The version a name-only job gets: the first candidate that has loaded here; else the first
        not known to fail (its jobs wait for the load); else the first (its jobs fail with its reason)."""
        candidates = self.log.candidate_order(name)
        pending = None
        for version in candidates:
            state = self.health.state(adapter_key(name, version))
            if state is Load.READY:
                return version
            if state is not Load.FAILED and pending is None:
                pending = version
        return pending or (candidates[0] if candidates else None)

    def route_in_force(self, task: str, tenant: str | None) -> RouteSet | None:
        """The route for (task, tenant), else for (task, any tenant), chosen by `choose_route` over the
        tenant's routes followed by the task's: a tenant's new route waits for its loads like any other."""
        own = self.log.routes(task, tenant) if tenant is not None else []
        return self.choose_route(own + self.log.routes(task, None))

    def choose_route(self, routes: list[RouteSet]) -> RouteSet | None:
        """Of routes newest first: the newest whose targets have all loaded here (a mix target: all its
        members); else the newest none of whose versions is known to fail (its jobs wait for the loads);
        else the newest."""
        pending = None
        for route in routes:
            states = list(self._route_states(route).values())
            if all(s is Load.READY for s in states):
                return route
            if Load.FAILED not in states and pending is None:
                pending = route
        return pending or (routes[0] if routes else None)

    def _route_states(self, route: RouteSet) -> dict[str, Load | None]:
        """The load state of every version the route's targets serve from ("name@version" keys)."""
        return {ref: self._target_state(ref) for target in route.targets for ref in target.versions()}

    def _target_state(self, ref: str) -> Load | None:
        name, _, version = ref.partition("@")
        if self.log.published(name, version) is None:
            return Load.FAILED  # retired or never published: a route through it cannot serve
        return self.health.state(ref)

    def serves(self, key: str) -> bool:
        """Whether version `key` takes traffic here now: its name's jobs, or a route in force through it."""
        name, _, version = key.partition("@")
        if self.serving(name) == version:
            return True
        routes = (self.route_in_force(*route_key) for route_key in self._routes_through.get(name, ()))
        return any(key in target.versions() for route in routes if route is not None for target in route.targets)

    def to_load(self) -> list[str]:
        """Versions to warm up now: for each name and each task, the next in serving order that has not
        been tried here, unless an earlier one has loaded or is loading. Names first (sorted), then
        routes (by task, then tenant), each version once."""
        for name in self._stale_names:
            wanted = self._wanted_for_name(name)
            if wanted is None:
                self._wanted_by_name.pop(name, None)
            else:
                self._wanted_by_name[name] = wanted
        self._stale_names.clear()
        for route_key in self._stale_routes:
            self._index_route(route_key)
            wanted_refs = self._wanted_for_route(route_key)
            if wanted_refs:
                self._wanted_by_route[route_key] = wanted_refs
            else:
                self._wanted_by_route.pop(route_key, None)
        self._stale_routes.clear()
        self._compact_wanted()
        wanted = [self._wanted_by_name[name] for name in sorted(self._wanted_by_name)]
        for route_key in sorted(self._wanted_by_route, key=lambda k: (k[0], k[1] or "")):
            wanted += self._wanted_by_route[route_key]
        return list(dict.fromkeys(wanted))

    def _compact_wanted(self) -> None:
        """A dict keeps the slots of removed keys until it grows again, and iterating it walks them all: after
        a start-up that wanted 50,000 versions, every later to_load would. Copy it once it is well below its
        peak (amortized O(1) per removal)."""
        size = len(self._wanted_by_name) + len(self._wanted_by_route)
        self._wanted_peak = max(self._wanted_peak, size)
        if size * 4 < self._wanted_peak:
            self._wanted_by_name, self._wanted_by_route = dict(self._wanted_by_name), dict(self._wanted_by_route)
            self._wanted_peak = size

    def _wanted_for_name(self, name: str) -> str | None:
        for version in self.log.candidate_order(name):
            state = self.health.state(adapter_key(name, version))
            if state is Load.FAILED:
                continue
            return adapter_key(name, version) if state is None else None
        return None

    def _wanted_for_route(self, route_key: RouteKey) -> list[str]:
        for route in self.log.routes(*route_key):
            states = self._route_states(route)
            if Load.FAILED in states.values():
                continue
            return [ref for ref, state in states.items() if state is None]
        return []

    def _index_route(self, route_key: RouteKey) -> None:
        """Note which names the route key's routes go through, so their changes reach it."""
        names = {ref.partition("@")[0] for route in self.log.routes(*route_key)
                 for target in route.targets for ref in target.versions()}
        for name in self._names_of_route.pop(route_key, set()) - names:
            through = self._routes_through[name]
            through.discard(route_key)
            if not through:
                del self._routes_through[name]
        for name in names:
            self._routes_through.setdefault(name, set()).add(route_key)
        if names:
            self._names_of_route[route_key] = names

    # ---- jobs -------------------------------------------------------------------------------------

    def knows_job(self, job: Job) -> bool:
        """Whether the control log read so far can place the job (False: read it further first)."""
        if job.adapter is not None:
            return self._knows(job.adapter)
        if job.mix is not None:
            return all(self._knows(member.adapter) for member in job.mix)
        if job.task is not None:
            return self.route_in_force(job.task, job.tenant) is not None
        return True

    def resolve_job(self, job: Job) -> ResolvedAdapter | None:
        """The adapter version for a job: its explicit adapter, else its task's route, else the base model
        (None). JobError adapter_not_found (no such version, no route for the task) / forbidden."""
        if job.adapter is not None:
            return self.resolve(job.adapter, job.tenant)
        if job.mix is not None:
            return self.resolve_mix(job.mix, job.tenant)
        if job.task is None:
            return None
        route = self.route_in_force(job.task, job.tenant)
        if route is None:
            raise JobError("adapter_not_found", f"no route for task {job.task}")
        try:
            resolved = self._resolve_target(pick_target(route, job.user, job.id), job.tenant)
        except JobError as err:
            if err.code == "forbidden":  # name the task, not the version the route chose
                raise JobError("forbidden", f"tenant {job.tenant} may not use the adapter routed for task {job.task}")
            raise
        return replace(resolved, route=route)

    def _resolve_target(self, target: RouteTarget, tenant: str) -> ResolvedAdapter:
        if target.mix is not None:
            return self.resolve_mix(target.mix, tenant)  # the tenant must be allowed every member
        return self.resolve(target.adapter, tenant)

    def resolve_mix(self, members: list[MixMember], tenant: str) -> ResolvedAdapter:
        """Every member → its version (JobError adapter_not_found / forbidden naming that member)."""
        resolved = tuple((self.resolve(member.adapter, tenant), member.weight) for member in members)
        key = mix_key([(adapter.key, weight) for adapter, weight in resolved])
        return ResolvedAdapter("mix", "", key, mix=resolved)

    def load_failure(self, resolved: ResolvedAdapter) -> str | None:
        """Why the job's adapter (a mix: its first member that did) failed to load here, if it did."""
        for adapter in [member for member, _ in resolved.mix] or [resolved]:
            failure = self.health.failure(adapter.key)
            if failure is not None:
                return failure
        return None

    def _knows(self, ref_text: str) -> bool:
        ref = parse_adapter_ref(ref_text)
        if ref.version is None:
            return bool(self.log.candidate_order(ref.name))
        return self.log.published(ref.name, ref.version) is not None

    def resolve(self, ref_text: str, tenant: str) -> ResolvedAdapter:
        """Name or name@version → the version to serve; JobError adapter_not_found / forbidden."""
        ref = parse_adapter_ref(ref_text)
        version = ref.version or self.serving(ref.name)
        publish: AdapterPublish | None = self.log.published(ref.name, version) if version else None
        if publish is None:
            raise JobError("adapter_not_found", f"adapter {ref_text} is not published")
        if publish.tenants is not None and tenant not in publish.tenants:
            # Name only what the job asked for: the serving version is none of this tenant's business.
            raise JobError("forbidden", f"tenant {tenant} may not use adapter {ref_text}")
        return ResolvedAdapter(ref.name, version, adapter_key(ref.name, version))
