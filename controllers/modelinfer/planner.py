"""The ModelInfer planner: compare the desired InferGroups with what exists, return the actions.

Pure and level-triggered: ``plan(spec, observed, state, now)`` looks only at its arguments. Running
it again on the same world gives the same actions; running it after the actions were applied gives
the next step. Every decision about groups, roles, scaling, rolling updates and recovery is here.

Groups. A group is identified by its index (label ``group``); the set of groups is what exists,
not ``range(replicas)``, because scale-down may remove any group. Scale-up fills the indices of
groups deleted to be recreated first, then the lowest free indices.

Revisions. Each group has a revision (pods' ``revision`` label); its template comes from the
spec (update revision) or from a ControllerRevision (older revisions). New groups with
``index < partition`` are created at the current revision, others at the update revision.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Literal

from controllers.modelinfer import manifests as m
from controllers.modelinfer.spec import resolve
from controllers.modelinfer.types import (
    LABEL_REVISION,
    ChildToCreate,
    EventNote,
    GroupState,
    GroupTemplate,
    InvalidSpec,
    LabelPatch,
    Observed,
    ObservedPod,
    Plan,
    PlannerState,
    Resolved,
    SpecProblem,
    generation_of,
    instance_size,
    name_of,
)
from crds.common import Condition
from crds.workload import ModelInfer

__all__ = ["plan"]


@dataclass(slots=True)
class _Instance:
    role: str
    role_replica: int
    pods: dict[int, ObservedPod] = field(default_factory=dict)
    serving: int = 0  # pods running, ready, not terminating
    first: ObservedPod | None = None


@dataclass(slots=True)
class _Group:
    index: int
    instances: dict[tuple[str, int], _Instance] = field(default_factory=dict)
    revisions: dict[str, int] = field(default_factory=dict)
    live_pods: int = 0  # not terminating
    cost: int | None = None

    def revision(self, fallback: str) -> str:
        if not self.revisions:
            return fallback
        if len(self.revisions) == 1:
            return next(iter(self.revisions))
        best = max(self.revisions.values())
        if self.revisions.get(fallback, 0) == best:
            return fallback
        return min(r for r, n in self.revisions.items() if n == best)


def _index(pods: tuple[ObservedPod, ...]) -> dict[int, _Group]:
    groups: dict[int, _Group] = {}
    for p in pods:
        g = groups.get(p.group)
        if g is None:
            g = groups[p.group] = _Group(p.group)
        key = (p.role, p.role_replica)
        inst = g.instances.get(key)
        if inst is None:
            inst = g.instances[key] = _Instance(p.role, p.role_replica, first=p)
        inst.pods[p.index] = p
        revs = g.revisions
        revs[p.revision] = revs.get(p.revision, 0) + 1
        if not p.terminating:
            g.live_pods += 1
            if p.deletion_cost or g.cost is None:
                g.cost = p.deletion_cost if g.cost is None else max(g.cost, p.deletion_cost)
            if p.ready and p.phase == "Running":
                inst.serving += 1
    return groups


def _group_complete(g: _Group, tmpl: GroupTemplate) -> bool:
    for role in tmpl.roles:
        for rr in range(role.replicas):
            inst = g.instances.get((role.name, rr))
            if inst is None or len(inst.pods) != instance_size(role):
                return False
    return True


_MAX_MESSAGE = 32768  # Condition.message's maxLength in the API


def _iso(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Planner:
    def __init__(
        self,
        mi: ModelInfer,
        resolved: Resolved,
        observed: Observed,
        state: PlannerState,
        now: float,
    ) -> None:
        self.mi = mi
        self.name = name_of(mi)
        self.generation = generation_of(mi)
        self.replicas = mi.spec.replicas
        self.template = resolved.template
        self.partition = resolved.partition
        self.max_unavailable = resolved.max_unavailable
        self.rollout_type = mi.spec.rollout_strategy.type
        self.recovery = mi.spec.recovery_policy
        self.grace = float(mi.spec.template.restart_grace_period_seconds or 0)
        self.obs = observed
        self.state = state
        self.now = now
        self.plan = Plan()
        self.update_rev = self.template.revision
        self.templates: dict[str, GroupTemplate] = dict(observed.revisions)
        self.templates[self.update_rev] = self.template
        cur = observed.current_revision
        self.current_rev = cur if cur else self.update_rev
        self.gang = observed.gang_available and self.template.uses_volcano()
        self.failures: dict[str, float] = {}
        self.recreating: set[int] = set(state.recreating)
        self.states: dict[int, GroupState] = {}
        self.deleted: set[str] = set()
        self.created_groups: list[int] = []
        self.ready_cache: dict[int, bool] = {}
        self.size_memo: dict[tuple[str, str, str], int] = {}
        self.touched: set[int] = set()  # groups with a pod deleted by this plan
        self.removed_groups: list[int] = []

    # ---- helpers -------------------------------------------------------------------------
    def template_for(self, rev: str) -> GroupTemplate:
        return self.templates.get(rev) or self.template

    def instance_size(self, inst: _Instance, fallback: GroupTemplate) -> int:
        """Pods an instance should have, by the revision its pods were made from."""
        p = inst.first
        if p is not None:
            memo_key = (p.revision, p.role_revision, inst.role)
            size = self.size_memo.get(memo_key)
            if size is None:
                tmpl = self.templates.get(p.revision)
                role = tmpl.by_name.get(inst.role) if tmpl is not None else None
                size = 0
                if (
                    tmpl is not None
                    and role is not None
                    and tmpl.role_revisions[role.name] == p.role_revision
                ):
                    size = instance_size(role)
                self.size_memo[memo_key] = size
            if size:
                return size
        role = fallback.by_name.get(inst.role)
        return instance_size(role) if role is not None else len(inst.pods)

    def group_ready(self, g: _Group) -> bool:
        """Every expected role instance exists, complete, every pod running and ready."""
        cached = self.ready_cache.get(g.index)
        if cached is not None:
            return cached
        tmpl = self.template_for(self.structure_revision(g))
        ok = True
        for role in tmpl.roles:
            for rr in range(role.replicas):
                if (role.name, rr) not in g.instances:
                    ok = False
        if ok:
            for inst in g.instances.values():
                size = self.instance_size(inst, tmpl)
                if inst.serving != size or len(inst.pods) != size:
                    ok = False
                    break
        self.ready_cache[g.index] = ok
        return ok

    def delete_pod(self, p: ObservedPod) -> None:
        if not p.terminating and p.name not in self.deleted:
            self.deleted.add(p.name)
            self.touched.add(p.group)
            self.plan.delete_pods.append(p.name)

    def delete_instance(self, inst: _Instance) -> None:
        for p in inst.pods.values():
            self.delete_pod(p)

    def delete_group(self, g: _Group) -> None:
        for inst in g.instances.values():
            self.delete_instance(inst)

    def create_instance(self, tmpl: GroupTemplate, role_name: str, group: int, rr: int) -> None:
        role = tmpl.by_name[role_name]
        for i in range(instance_size(role)):
            manifest = m.pod_manifest(self.mi, tmpl, role, group, rr, i, self.gang)
            self.plan.create_pods.append(ChildToCreate(manifest["metadata"]["name"], manifest))

    # ---- main ----------------------------------------------------------------------------
    def run(self) -> Plan:
        groups = _index(self.obs.pods)
        kept, victims = self.choose_groups(groups)
        for g in victims:
            self.delete_group(g)
            self.states[g.index] = GroupState.DELETING
            self.removed_groups.append(g.index)
            self.recreating.discard(g.index)
        new_indices = self.new_group_indices(groups, self.replicas - len(kept))
        targets: dict[int, GroupTemplate] = {}
        for g in kept:
            targets[g.index] = self.reconcile_group(g)
        for idx in new_indices:
            rev = self.current_rev if idx < self.partition else self.update_rev
            if rev not in self.templates:
                rev = self.update_rev
            tmpl = self.templates[rev]
            for role in tmpl.roles:
                for rr in range(role.replicas):
                    self.create_instance(tmpl, role.name, idx, rr)
            targets[idx] = tmpl
            self.states[idx] = GroupState.STARTING
            self.created_groups.append(idx)
            self.recreating.discard(idx)
        self.rollout(kept, targets)
        self.children(targets)
        self.revisions(groups)
        self.plan.state = PlannerState(
            failures_first_seen=self.failures,
            recreating=frozenset(i for i in self.recreating if i not in targets or i in groups),
        )
        self.plan.status = self.status(groups, kept, targets)
        counts: dict[GroupState, int] = dict.fromkeys(GroupState, 0)
        for st in self.states.values():
            counts[st] += 1
        self.plan.groups_by_state = counts
        return self.plan

    def choose_groups(self, groups: dict[int, _Group]) -> tuple[list[_Group], list[_Group]]:
        """Keep `replicas` groups; victims: deleting ones, not ready, cheapest, highest index."""
        live = list(groups.values())
        excess = len(live) - self.replicas
        if excess <= 0:
            return live, []

        def key(g: _Group) -> tuple[int, int, int, int]:
            terminating = 0 if g.live_pods == 0 else 1
            ready = 1 if self.group_ready(g) else 0
            return (terminating, ready, g.cost or 0, -g.index)

        live.sort(key=key)
        return sorted(live[excess:], key=lambda g: g.index), live[:excess]

    def new_group_indices(self, groups: dict[int, _Group], missing: int) -> list[int]:
        if missing <= 0:
            return []
        out: list[int] = []
        for idx in sorted(self.recreating):
            if len(out) < missing and idx not in groups:
                out.append(idx)
        idx = 0
        while len(out) < missing:
            if idx not in groups and idx not in out:
                out.append(idx)
            idx += 1
        return sorted(out)

    def structure_revision(self, g: _Group) -> str:
        own = g.revision(self.update_rev)
        if own not in self.templates:
            own = self.update_rev
        if self.rollout_type == "RoleRollingUpdate" and g.index >= self.partition:
            return self.update_rev
        return own

    def reconcile_group(self, g: _Group) -> GroupTemplate:
        """Recovery and completion of one kept group; returns the template it is built to."""
        tmpl = self.template_for(self.structure_revision(g))
        if g.live_pods == 0:
            # every pod is terminating (a recreate or a replacement in flight): wait for them
            self.states[g.index] = GroupState.RECOVERING
            return tmpl
        expected: set[tuple[str, int]] = set()
        broken: list[_Instance] = []
        to_create: list[tuple[str, int]] = []
        healthy = 0
        for role in tmpl.roles:
            for rr in range(role.replicas):
                key = (role.name, rr)
                expected.add(key)
                inst = g.instances.get(key)
                if inst is None:
                    to_create.append(key)
                    continue
                size = self.instance_size(inst, tmpl)
                if inst.serving == size and len(inst.pods) == size:
                    healthy += 1
                    continue  # healthy: the common case, decided without looking at pods
                for i, p in inst.pods.items():
                    if i >= size:
                        self.delete_pod(p)  # a worker beyond the instance's size
                pods = [inst.pods.get(i) for i in range(size)]
                if all(p is None or p.terminating for p in pods):
                    if all(p is None for p in pods) and not any(
                        p.terminating for p in inst.pods.values()
                    ):
                        to_create.append(key)
                    continue
                if any(p is None or p.failed for p in pods):
                    broken.append(inst)
        if self.rollout_type == "GroupRollingUpdate" or (g.index < self.partition):
            for key, inst in g.instances.items():
                if key not in expected:
                    self.delete_instance(inst)
        ready = healthy == len(expected)
        if ready and len(g.instances) != len(expected):
            ready = self.group_ready(g)  # instances outside the template must be healthy too
        self.ready_cache[g.index] = ready
        state = GroupState.READY if ready else GroupState.STARTING
        if broken and self.recovery != "None":
            due = self.due_failures(g, broken)
            if due:
                state = GroupState.RECOVERING
                if self.recovery == "GroupRecreate":
                    self.delete_group(g)
                    self.recreating.add(g.index)
                    self.plan.events.append(
                        EventNote(
                            "Warning",
                            "GroupRecreate",
                            f"recreating InferGroup {g.index}: pod failure in "
                            + ", ".join(f"{i.role}/{i.role_replica}" for i in due),
                        )
                    )
                    self.states[g.index] = state
                    return tmpl
                for inst in due:
                    self.delete_instance(inst)
                    self.plan.events.append(
                        EventNote(
                            "Warning",
                            "RoleRecreate",
                            f"recreating role instance {inst.role}/{inst.role_replica} "
                            f"of InferGroup {g.index} after a pod failure",
                        )
                    )
            elif broken:
                state = GroupState.RECOVERING
        elif broken:
            state = GroupState.RECOVERING
        for role_name, rr in to_create:
            self.create_instance(tmpl, role_name, g.index, rr)
        self.states[g.index] = state
        return tmpl

    def due_failures(self, g: _Group, broken: list[_Instance]) -> list[_Instance]:
        grace = self.grace
        due: list[_Instance] = []
        for inst in broken:
            key = f"{g.index}/{inst.role}/{inst.role_replica}"
            seen = self.state.failures_first_seen.get(key, self.now)
            for p in inst.pods.values():
                if p.failed_at is not None:
                    seen = min(seen, p.failed_at)
            if self.now - seen >= grace:
                due.append(inst)
            else:
                self.failures[key] = seen
                wait = seen + grace - self.now
                rq = self.plan.requeue_after
                self.plan.requeue_after = wait if rq is None else min(rq, wait)
        return due

    # ---- rolling update ------------------------------------------------------------------
    def rollout(self, kept: list[_Group], targets: dict[int, GroupTemplate]) -> None:
        ready = sum(
            1
            for g in kept
            if self.states.get(g.index) is GroupState.READY and g.index not in self.touched
        )
        unavailable = max(0, self.replicas - ready)
        candidates: list[_Group] = []
        for g in kept:
            if g.index < self.partition or g.live_pods == 0:
                continue
            if g.index in self.touched:
                continue  # already being recovered this round
            if self.rollout_type == "GroupRollingUpdate":
                if set(g.revisions) != {self.update_rev}:
                    candidates.append(g)
            elif self.role_outdated(g) or self.needs_relabel(g):
                candidates.append(g)
        candidates.sort(key=lambda g: (self.states.get(g.index) is GroupState.READY, -g.index))
        for g in candidates:
            is_ready = self.states.get(g.index) is GroupState.READY
            if self.rollout_type == "RoleRollingUpdate" and not self.role_outdated(g):
                self.relabel(g)  # nothing to replace: only the revision label moves
                continue
            if is_ready:
                if unavailable >= self.max_unavailable:
                    continue
                unavailable += 1
            self.states[g.index] = GroupState.UPDATING
            if self.rollout_type == "GroupRollingUpdate":
                self.delete_group(g)
                self.recreating.add(g.index)
            else:
                self.relabel(g)
                self.replace_next_role(g)

    def role_outdated(self, g: _Group) -> bool:
        tmpl = self.template
        for (role_name, rr), inst in g.instances.items():
            role = tmpl.by_name.get(role_name)
            if role is None or rr >= role.replicas:
                return True
            for p in inst.pods.values():
                if not p.terminating and p.role_revision != tmpl.role_revisions[role_name]:
                    return True
        return False

    def needs_relabel(self, g: _Group) -> bool:
        return any(rev != self.update_rev for rev in g.revisions)

    def relabel(self, g: _Group) -> None:
        tmpl = self.template
        for (role_name, _rr), inst in g.instances.items():
            role = tmpl.by_name.get(role_name)
            if role is None:
                continue
            for p in inst.pods.values():
                if (
                    not p.terminating
                    and p.role_revision == tmpl.role_revisions[role_name]
                    and p.revision != self.update_rev
                ):
                    self.plan.relabel_pods.append(
                        LabelPatch(p.name, {LABEL_REVISION: self.update_rev})
                    )

    def replace_next_role(self, g: _Group) -> None:
        """RoleRollingUpdate: replace the outdated instances of the first outdated role."""
        tmpl = self.template
        for (role_name, rr), inst in list(g.instances.items()):
            role = tmpl.by_name.get(role_name)
            if role is None or rr >= role.replicas:
                self.delete_instance(inst)  # a role or role replica that no longer exists
        for role in tmpl.roles:
            outdated = [
                inst
                for (rn, _rr), inst in g.instances.items()
                if rn == role.name
                and any(
                    p.role_revision != tmpl.role_revisions[role.name] for p in inst.pods.values()
                )
            ]
            if outdated:
                for inst in outdated:
                    self.delete_instance(inst)
                return

    # ---- Services, PodGroups, revisions --------------------------------------------------
    def children(self, targets: dict[int, GroupTemplate]) -> None:
        want_svc: dict[str, tuple[GroupTemplate, str, int, int]] = {}
        for idx, tmpl in targets.items():
            for role in tmpl.roles:
                if role.worker_replicas > 0:
                    for rr in range(role.replicas):
                        want_svc[m.instance_name(self.name, idx, role.name, rr)] = (
                            tmpl,
                            role.name,
                            idx,
                            rr,
                        )
        have_svc = {s.name for s in self.obs.services}
        for s in self.obs.services:
            if s.name not in want_svc:
                self.plan.delete_services.append(s.name)
        for name, (tmpl, role_name, idx, rr) in want_svc.items():
            if name not in have_svc:
                manifest = m.service_manifest(self.mi, tmpl.by_name[role_name], idx, rr)
                self.plan.create_services.append(ChildToCreate(name, manifest))
        have_pg = {pg.name: pg for pg in self.obs.podgroups}
        want_pg: set[str] = set()
        if self.gang:
            for idx, tmpl in targets.items():
                name = m.podgroup_name(self.name, idx)
                want_pg.add(name)
                manifest = m.podgroup_manifest(self.mi, tmpl, idx)
                current = have_pg.get(name)
                if current is None:
                    self.plan.create_podgroups.append(ChildToCreate(name, manifest))
                elif current.min_member != manifest["spec"]["minMember"]:
                    self.plan.patch_podgroups.append(
                        ChildToCreate(name, {"spec": manifest["spec"]})
                    )
        for name in have_pg:
            if name not in want_pg:
                self.plan.delete_podgroups.append(name)

    def revisions(self, groups: dict[int, _Group]) -> None:
        if self.update_rev not in self.obs.revisions:
            manifest = m.revision_manifest(self.mi, self.template)
            self.plan.create_revisions.append(ChildToCreate(manifest["metadata"]["name"], manifest))
        used = {self.update_rev}
        if self.partition > 0:
            used.add(self.current_rev)  # new groups below the partition are made from it
        for g in groups.values():
            used.update(g.revisions)
        for rev in self.obs.revisions:
            if rev not in used:
                self.plan.delete_revisions.append(m.revision_name(self.name, rev))

    # ---- status --------------------------------------------------------------------------
    def condition(self, type_: str, status: bool, reason: str, message: str) -> Condition:
        return _condition(self.obs, self.now, type_, status, reason, message)

    def status(
        self, groups: dict[int, _Group], kept: list[_Group], targets: dict[int, GroupTemplate]
    ) -> dict[str, Any] | None:
        existing = [g for g in kept if g.live_pods > 0]
        ready = sum(
            1
            for g in existing
            if self.states.get(g.index) is GroupState.READY and g.index not in self.touched
        )
        updated = sum(
            1
            for g in existing
            if g.index not in self.touched
            and len(g.revisions) == 1
            and self.update_rev in g.revisions
            and (self.ready_cache.get(g.index) or _group_complete(g, self.template))
        )
        current_rev = self.current_rev
        if updated == self.replicas and ready == self.replicas and not self.plan.has_changes:
            current_rev = self.update_rev
        converged = (
            not self.plan.has_changes
            and ready == self.replicas
            and len(groups) == self.replicas
            and not self.failures
        )
        pending_update = [
            g.index
            for g in kept
            if g.index >= self.partition and set(g.revisions) != {self.update_rev}
        ]
        min_ready = max(1, self.replicas - self.max_unavailable) if self.replicas > 0 else 0
        conds = [
            self.condition("SpecValid", True, "Valid", "the spec is valid"),
            self.condition(
                "Available",
                ready >= min_ready,
                "MinimumGroupsReady" if ready >= min_ready else "GroupsUnavailable",
                f"{ready}/{self.replicas} InferGroups ready (at least {min_ready} needed)",
            ),
            self.condition(
                "Progressing",
                not converged,
                "Reconciling" if not converged else "Complete",
                "creating, deleting or waiting for InferGroups"
                if not converged
                else f"{self.replicas} InferGroups at the desired state",
            ),
            self.condition(
                "UpdateInProgress",
                bool(pending_update),
                "RollingUpdate" if pending_update else "Updated",
                f"{len(pending_update)} InferGroups not yet at revision {self.update_rev}"
                if pending_update
                else f"all InferGroups from index {self.partition} at revision {self.update_rev}",
            ),
        ]
        if self.template.uses_volcano():
            conds.append(
                self.condition(
                    "GangScheduling",
                    self.obs.gang_available,
                    "PodGroupsManaged" if self.obs.gang_available else "PodGroupCRDMissing",
                    "a Volcano PodGroup per InferGroup"
                    if self.obs.gang_available
                    else "schedulerName is volcano but the scheduling.volcano.sh/v1beta1 "
                    "PodGroup CRD is not served; pods are created without a PodGroup",
                )
            )
        status: dict[str, Any] = {
            "observedGeneration": self.generation,
            "replicas": len(existing),
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "availableReplicas": ready,
            "currentRevision": current_rev,
            "updateRevision": self.update_rev,
            "labelSelector": m.label_selector(self.name),
        }
        if self.created_groups:
            self.plan.events.append(
                EventNote(
                    "Normal",
                    "CreatingGroups",
                    "creating InferGroups " + ", ".join(map(str, self.created_groups)),
                )
            )
        if self.removed_groups:
            self.plan.events.append(
                EventNote(
                    "Normal",
                    "DeletingGroups",
                    "scale-down: deleting InferGroups " + ", ".join(map(str, self.removed_groups)),
                )
            )
        return _finish_status(self.obs, self.plan, status, conds)


def _condition(
    obs: Observed, now: float, type_: str, status: bool, reason: str, message: str
) -> Condition:
    """A condition; its lastTransitionTime moves only when its status changes."""
    st: Literal["True", "False"] = "True" if status else "False"
    since = _iso(now)
    for c in obs.conditions:
        if c.type == type_ and c.status == st:
            since = c.last_transition_time or since
            break
    return Condition(
        type=type_,
        status=st,
        reason=reason,
        message=message[:_MAX_MESSAGE],
        last_transition_time=since,
    )


def _finish_status(
    obs: Observed, p: Plan, status: dict[str, Any], conditions: list[Condition]
) -> dict[str, Any] | None:
    """`status` with `conditions`, an event per condition that changed status; None when the
    status is what the object already has (no patch)."""
    status["conditions"] = [
        c.model_dump(by_alias=True, exclude_none=True, mode="json") for c in conditions
    ]
    old = {c.type: c for c in obs.conditions}
    for c in conditions:
        prev = old.get(c.type)
        if prev is not None and prev.status != c.status:
            bad = c.status == "False" and c.type in ("Available", "SpecValid", "GangScheduling")
            kind = "Warning" if bad else "Normal"
            p.events.append(
                EventNote(kind, f"{c.type}{c.status}", f"{c.type} is {c.status}: {c.message}")
            )
    return None if _same_status(status, obs.status) else status


def _invalid_plan(
    name: str,
    generation: int,
    problems: tuple[SpecProblem, ...],
    obs: Observed,
    state: PlannerState,
    now: float,
) -> Plan:
    """A spec the planner will not act on: no pod is touched, SpecValid says why."""
    p = Plan(state=state)
    status: dict[str, Any] = dict(obs.status)
    status.pop("conditions", None)
    status["observedGeneration"] = generation
    status["labelSelector"] = m.label_selector(name)
    msg = "; ".join(f"{x.field}: {x.message}" for x in problems)
    conds = [c for c in obs.conditions if c.type != "SpecValid"]
    conds.append(_condition(obs, now, "SpecValid", False, problems[0].reason, msg))
    p.status = _finish_status(obs, p, status, conds)
    return p


def _same_status(new: dict[str, Any], old: Any) -> bool:
    if not isinstance(old, dict):
        return False
    return all(old.get(k) == v for k, v in new.items())


def plan(
    spec: ModelInfer | InvalidSpec,
    observed: Observed,
    state: PlannerState | None = None,
    now: float = 0.0,
) -> Plan:
    """The actions that move the cluster one step towards `spec`; ``now`` is epoch seconds.

    `spec` is the ModelInfer as the API models validated it, or, when they rejected it, the
    problems to report (see :func:`controllers.modelinfer.spec.parse`).
    """
    state = state or PlannerState()
    if isinstance(spec, InvalidSpec):
        return _invalid_plan(spec.name, spec.generation, spec.problems, observed, state, now)
    resolved = resolve(spec)
    if resolved.problems:
        gen = generation_of(spec)
        return _invalid_plan(name_of(spec), gen, resolved.problems, observed, state, now)
    return _Planner(spec, resolved, observed, state, now).run()
