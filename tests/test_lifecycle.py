"""One list of instance states: the types that spell the names again agree with the enum."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

from comfyfleet.agent.report import STAGES, Stage
from comfyfleet.lifecycle import (
    BOOT_STAGES,
    INSTANCE_STATE_NAMES,
    InstanceState,
    InstanceStateName,
)
from comfyfleet.pool.policy import STATES, State


def test_the_state_name_type_spells_the_enum_in_order() -> None:
    assert get_args(InstanceStateName) == tuple(s.value for s in InstanceState)
    assert tuple(InstanceState) == INSTANCE_STATE_NAMES
    assert get_args(State) == STATES == INSTANCE_STATE_NAMES


def test_the_agent_reports_the_boot_stages_from_booting_and_failed() -> None:
    assert get_args(Stage) == STAGES
    assert (*BOOT_STAGES[BOOT_STAGES.index(InstanceState.BOOTING) :], "failed") == STAGES


def test_the_pool_and_the_labels_need_no_database() -> None:
    code = (
        "import sys\n"
        "sys.modules['sqlalchemy'] = None\n"
        "import comfyfleet.pool, comfyfleet.labels, comfyfleet.lifecycle\n"
        "assert 'comfyfleet.store' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
