"""The pool: the failure policy and the reconcile planner, pure functions over typed values.

``policy.assess`` says whether one instance has failed and why; ``policy.fleet_brakes``
says when renting must stop; ``planner.plan`` turns the desired pools and what runs into
actions. The loop that reads the store and the provider and takes the actions lives
beside them and calls these.
"""

from comfyfleet.pool.planner import (
    DEFAULT_PLANNER_SETTINGS,
    TERMINAL,
    Abandon,
    Action,
    Adopt,
    Alert,
    Destroy,
    DestroyOrphan,
    ObservedInstance,
    PlannerSettings,
    PoolPolicyLike,
    ProviderContract,
    Rent,
    Replace,
    ScaleDown,
    changes_state,
    make_label,
    parse_label,
    plan,
)
from comfyfleet.pool.policy import (
    DEFAULT_POLICY_SETTINGS,
    DEFAULT_STAGE_DEADLINES,
    OK,
    STATES,
    Brake,
    Brakes,
    InstanceFacts,
    PolicySettings,
    RentalRecord,
    State,
    Verdict,
    assess,
    fleet_brakes,
)

__all__ = [
    "DEFAULT_PLANNER_SETTINGS",
    "DEFAULT_POLICY_SETTINGS",
    "DEFAULT_STAGE_DEADLINES",
    "OK",
    "STATES",
    "TERMINAL",
    "Abandon",
    "Action",
    "Adopt",
    "Alert",
    "Brake",
    "Brakes",
    "Destroy",
    "DestroyOrphan",
    "InstanceFacts",
    "ObservedInstance",
    "PlannerSettings",
    "PolicySettings",
    "PoolPolicyLike",
    "ProviderContract",
    "Rent",
    "RentalRecord",
    "Replace",
    "ScaleDown",
    "State",
    "Verdict",
    "assess",
    "changes_state",
    "fleet_brakes",
    "make_label",
    "parse_label",
    "plan",
]
