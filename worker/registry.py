"""What the control topic says: published adapter versions, each name's active version, and who may use them."""

from __future__ import annotations

from dataclasses import dataclass

from schemas import AdapterActivate, AdapterPublish, ControlEvent, JobError, parse_adapter_ref


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    version: str
    key: str  # the engine's adapter key, "name@version"


class AdapterRegistry:
    def __init__(self):
        self.versions: dict[str, dict[str, AdapterPublish]] = {}
        self.active: dict[str, str] = {}

    def apply(self, event: ControlEvent) -> list[str]:
        """Apply one control event; returns the keys that became active (to warm up)."""
        if isinstance(event, AdapterPublish):
            self.versions.setdefault(event.name, {})[event.version] = event
            if event.name not in self.active:
                self.active[event.name] = event.version
                return [f"{event.name}@{event.version}"]
            return []
        if isinstance(event, AdapterActivate):
            if event.version not in self.versions.get(event.name, {}):
                raise KeyError(f"activate {event.name}@{event.version}: that version was never published")
            self.active[event.name] = event.version
            return [f"{event.name}@{event.version}"]
        raise TypeError(event)

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
            raise JobError("forbidden", f"tenant {tenant} may not use adapter {ref.name}@{version}")
        return ResolvedAdapter(ref.name, version, f"{ref.name}@{version}")
