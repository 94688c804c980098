"""The launcher's supervision settings: the restart delays (0.5 s doubling up to 30 s, 0.5 s again after 60 s up),
the exit a warning names, and the StackConfig options that reach the gateway or turn supervision off."""

import pytest

from apex_serve.flags import parse_config
from apex_tools.launcher import Stack, StackConfig
from apex_tools.supervisor import Backoff, describe_exit


def _delays(backoff: Backoff, uptimes_s: list[float]) -> list[float]:
    """The delays of a service that exits after each of uptimes_s in turn."""
    delays: list[float] = []
    for uptime_s in uptimes_s:
        delays.append(backoff.delay(delays[-1] if delays else None, uptime_s))
    return delays


def test_restart_delays_double_from_half_a_second_up_to_thirty() -> None:
    assert _delays(Backoff(), [0.1] * 9) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_service_up_sixty_seconds_restarts_after_half_a_second_again() -> None:
    assert _delays(Backoff(), [1.0, 1.0, 1.0, 59.0, 60.0, 1.0]) == [0.5, 1.0, 2.0, 4.0, 0.5, 1.0]


@pytest.mark.parametrize("fields", [{"initial_s": 0.0}, {"initial_s": 2.0, "max_s": 1.0}, {"reset_after_s": 0.0}])
def test_a_backoff_that_cannot_work_is_refused(fields: dict) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**fields)


def test_an_exit_is_described_by_its_code_and_the_signal_that_ended_it() -> None:
    assert describe_exit(1) == "code 1"
    assert describe_exit(-9) == "code -9 (SIGKILL)"
    assert describe_exit(-15) == "code -15 (SIGTERM)"


def _gateway_flags(config: StackConfig) -> list[str]:
    (args,) = [args for module, _, args in Stack(config).commands() if module == "gateway"]
    return args


def test_the_stacks_stall_timeout_reaches_the_gateway() -> None:
    args = _gateway_flags(parse_config(StackConfig, ["--stall-timeout-s", "12.5"], "test"))
    assert args[args.index("--stall-timeout-s") + 1] == "12.5"
    with pytest.raises(ValueError, match="stall_timeout_s"):
        StackConfig(stall_timeout_s=-1.0)


def test_supervision_is_on_unless_turned_off() -> None:
    assert StackConfig().supervise is True
    assert parse_config(StackConfig, ["--no-supervise"], "test").supervise is False
