"""What the control topic says: published adapter versions, each name's active version, and who may use them."""

from __future__ import annotations

from dataclasses import dataclass

from lorabus.schemas import AdapterPublish, JobError, parse_adapter_ref


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    version: str
    key: str  # the engine's adapter key, "name@version"


class AdapterRegistry:
    def __init__(self):
        self.versions: dict[str, dict[str, AdapterPublish]] = {}
        self.active: dict[str, str] = {}

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
