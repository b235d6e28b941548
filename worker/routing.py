"""Task routes: which adapter version serves a job that names a task instead of an adapter.

A route's targets split traffic by weight. The split is sticky and the same on every worker: a job's
sticky key (its `user`, or its `id` when the route is `sticky: "id"` or the job has no user) is hashed
as `h = first 8 bytes, big-endian, of SHA-256(task + "\\0" + key)`, and `h mod total_weight` falls into
the targets' cumulative weight ranges, in the order the route lists them. So a user stays on its version
while the route is unchanged, and growing the last target's weight (a canary) only moves users onto it.
"""

from __future__ import annotations

import hashlib

from lorabus.schemas import RouteSet, RouteTarget

_HASH_BYTES = 8


def sticky_point(task: str, key: str, total: int) -> int:
    digest = hashlib.sha256(f"{task}\0{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:_HASH_BYTES], "big") % total


def pick_target(route: RouteSet, user: str | None, job_id: str) -> RouteTarget:
    key = user if route.sticky == "user" and user is not None else job_id
    point = sticky_point(route.task, key, sum(t.weight for t in route.targets))
    for target in route.targets:
        if point < target.weight:
            return target
        point -= target.weight
    raise AssertionError("unreachable: the point lies below the total weight")

