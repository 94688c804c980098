"""The gateway's API keys come from --api-keys-file and the APEX_API_KEYS environment variable, never a flag's value:
parsing, the union of both, and the start-up errors and warning about the file."""

import dataclasses
import logging
from pathlib import Path

import pytest

from apex_serve.flags import parse_config
from gateway.config import API_KEYS_ENV, GatewayConfig


def _key_file(directory: Path, text: str, mode: int = 0o600) -> Path:
    path = directory / "api-keys"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture(autouse=True)
def no_keys_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEYS_ENV, raising=False)


def test_no_file_and_no_variable_means_no_authentication(default_model_dir: Path) -> None:
    assert GatewayConfig(model_dir=str(default_model_dir)).api_key_set == frozenset()


def test_file_keys_one_a_line_or_comma_separated_blank_lines_and_whitespace_ignored(
    default_model_dir: Path, tmp_path: Path
) -> None:
    keys = _key_file(tmp_path, "\n  k1  \n\nk2, k3 ,\n\t\n")
    config = parse_config(GatewayConfig, ["--model-dir", str(default_model_dir), "--api-keys-file", str(keys)], "")
    assert config.api_key_set == {"k1", "k2", "k3"}


def test_environment_keys_are_accepted_with_the_files(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEYS_ENV, " e1, e2 ,")
    assert GatewayConfig(model_dir=str(default_model_dir)).api_key_set == {"e1", "e2"}
    config = GatewayConfig(model_dir=str(default_model_dir), api_keys_file=str(_key_file(tmp_path, "f1")))
    assert config.api_key_set == {"e1", "e2", "f1"}


def test_keys_given_as_a_flag_value_do_not_start_the_gateway(default_model_dir: Path) -> None:
    assert [f.name for f in dataclasses.fields(GatewayConfig) if f.name.startswith("api_keys")] == ["api_keys_file"]
    with pytest.raises(SystemExit) as exited:  # no prefix matching: --api-keys is no --api-keys-file
        parse_config(GatewayConfig, ["--model-dir", str(default_model_dir), "--api-keys", "k1"], "")
    assert exited.value.code == 2


@pytest.mark.parametrize("text", ["", "\n , \n"])
def test_a_key_file_without_keys_stops_the_start(default_model_dir: Path, tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match=r"api_keys_file \(--api-keys-file\): no key in"):
        GatewayConfig(model_dir=str(default_model_dir), api_keys_file=str(_key_file(tmp_path, text)))


def test_a_missing_or_unreadable_key_file_stops_the_start_naming_the_flag(
    default_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"--api-keys-file.*cannot read .*nowhere: No such file or directory"):
        GatewayConfig(model_dir=str(default_model_dir), api_keys_file=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"--api-keys-file.*cannot read .*: Is a directory"):
        GatewayConfig(model_dir=str(default_model_dir), api_keys_file=str(tmp_path))


def test_a_key_file_others_may_read_is_a_warning(
    default_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        GatewayConfig(model_dir=str(default_model_dir), api_keys_file=str(_key_file(tmp_path, "k1", 0o600)))
        assert not caplog.records
        config = GatewayConfig(model_dir=str(default_model_dir), api_keys_file=str(_key_file(tmp_path, "k1", 0o644)))
    assert config.api_key_set == {"k1"}
    (record,) = caplog.records
    assert "open to group or others (mode 644)" in record.getMessage()
