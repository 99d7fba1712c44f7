"""server/config: defaults, snaprag.toml, env and --set overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import DEFAULT_CONFIG_PATH, Config, ConfigError, ProfileConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "snaprag.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(*args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        load_config(*args, **kwargs)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------
# Defaults and the shipped file


def test_defaults_validate() -> None:
    cfg = Config()
    assert cfg.validate() is cfg
    assert set(cfg.profiles) == {"voice", "robot"}
    for p in cfg.profiles.values():
        assert p.fallback_reserve_ms < p.total_ms


def test_snaprag_toml_loads() -> None:
    assert DEFAULT_CONFIG_PATH == REPO / "snaprag.toml"
    cfg = load_config(env={})
    explicit = load_config(REPO / "snaprag.toml", env={})
    assert cfg == explicit
    # 10000 ms is the file's value (the dataclass default is 800): the file was read, ints became floats.
    assert cfg.profiles["voice"].total_ms == 10000.0
    assert isinstance(cfg.profiles["voice"].total_ms, float)
    assert cfg.profiles["robot"].total_ms == 150.0
    assert cfg.server.port == 50051
    assert cfg.knowledge_base.paths == ["data/kb/voice", "data/kb/warehouse"]
    for path in (*cfg.knowledge_base.paths, cfg.fallback.rules_path, cfg.fallback.actions_path,
                 cfg.fallback.fault_codes_path):
        assert cfg.resolve_path(path).exists(), path


def test_file_values_override_defaults_and_keep_the_rest(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[server]\nport = 6001\n[profiles.robot]\ntotal_ms = 200\n"), env={})
    assert cfg.server.port == 6001
    assert cfg.server.host == "127.0.0.1"
    assert cfg.profiles["robot"].total_ms == 200.0
    assert cfg.profiles["robot"].retrieve_ms == 60.0  # the robot profile's own default, not ProfileConfig's


def test_file_may_add_a_profile(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[profiles.kiosk]\ntotal_ms = 400\n"), env={})
    assert cfg.profiles["kiosk"].total_ms == 400.0
    assert cfg.profiles["kiosk"].default_k == ProfileConfig().default_k


# ---------------------------------------------------------------------------------------------
# Env and --set overrides


def test_env_overrides_typed_fields() -> None:
    cfg = load_config(env={
        "SNAPRAG__SERVER__PORT": "6000",  # int
        "SNAPRAG__RETRIEVAL__BM25__K1": "1.2",  # float, nested section
        "SNAPRAG__RETRIEVAL__BM25__B": "1",  # an int literal for a float field
        "SNAPRAG__RERANK__ENABLED": "true",  # bool
        "SNAPRAG__SERVER__HOST": "0.0.0.0",  # bare string
        "SNAPRAG__KNOWLEDGE_BASE__PATHS": '["a", "b"]',  # list[str]
        "SNAPRAG__PROFILES__ROBOT__TOTAL_MS": "200",  # a profile field
        "SNAPRAG__SERVER__LOG_LEVEL": "debug",  # Literal
        "OTHER__SERVER__PORT": "1",  # not ours: ignored
    })
    assert cfg.server.port == 6000 and isinstance(cfg.server.port, int)
    assert cfg.retrieval.bm25.k1 == 1.2
    assert cfg.retrieval.bm25.b == 1.0 and isinstance(cfg.retrieval.bm25.b, float)
    assert cfg.rerank.enabled is True
    assert cfg.server.host == "0.0.0.0"
    assert cfg.knowledge_base.paths == ["a", "b"]
    assert cfg.profiles["robot"].total_ms == 200.0
    assert cfg.server.log_level == "debug"


def test_overrides_change_typed_fields() -> None:
    cfg = load_config(env={}, overrides=[
        "server.port=7000", "generation.min_support = 0.5", "server.reflection=false",
        "fallback.rules_path=/tmp/rules.toml", 'knowledge_base.paths=["x"]', "profiles.voice.default_k=7",
    ])
    assert cfg.server.port == 7000
    assert cfg.generation.min_support == 0.5
    assert cfg.server.reflection is False
    assert cfg.fallback.rules_path == "/tmp/rules.toml"
    assert cfg.knowledge_base.paths == ["x"]
    assert cfg.profiles["voice"].default_k == 7


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1111\ncpu_workers = 3\n")
    env = {"SNAPRAG__SERVER__PORT": "2222", "SNAPRAG__SERVER__CPU_WORKERS": "4"}
    cfg = load_config(path, env=env, overrides=["server.port=3333"])
    assert cfg.server.port == 3333
    assert cfg.server.cpu_workers == 4


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPRAG__SERVER__PORT", "6543")
    assert load_config().server.port == 6543
    assert load_config(env={}).server.port == 50051


# ---------------------------------------------------------------------------------------------
# Errors name the key


def test_unknown_key_in_file(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "[server]\nportt = 1\n"), env={})
    assert "server.portt" in msg and "unknown key" in msg
    assert "port" in msg.split("valid keys here:")[1]  # lists the valid keys


def test_unknown_section_in_file(tmp_path: Path) -> None:
    assert "srever" in error_of(write(tmp_path, "[srever]\nport = 1\n"), env={})


def test_unknown_key_in_profile_table(tmp_path: Path) -> None:
    assert "profiles.voice.total" in error_of(write(tmp_path, "[profiles.voice]\ntotal = 5\n"), env={})


def test_section_given_a_scalar_in_file(tmp_path: Path) -> None:
    assert "server: expected a table" in error_of(write(tmp_path, "server = 5\n"), env={})


def test_profile_given_a_scalar_in_file(tmp_path: Path) -> None:
    assert "profiles.voice" in error_of(write(tmp_path, "[profiles]\nvoice = 5\n"), env={})


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n")
    msg = error_of(path, env={})
    assert str(path) in msg and "not valid TOML" in msg


@pytest.mark.parametrize(("text", "key", "expected"), [
    ('[server]\nport = "6000"\n', "server.port", "expected an integer"),
    ("[server]\nport = 6000.0\n", "server.port", "expected an integer"),
    ("[server]\nport = true\n", "server.port", "expected an integer"),
    ("[server]\nreflection = 1\n", "server.reflection", "expected true or false"),
    ('[retrieval.bm25]\nk1 = "high"\n', "retrieval.bm25.k1", "expected a number"),
    ("[server]\nhost = 127\n", "server.host", "expected a string"),
    ('[knowledge_base]\npaths = "data/kb/voice"\n', "knowledge_base.paths", "expected a list"),
    ("[knowledge_base]\npaths = [1]\n", "knowledge_base.paths[0]", "expected a string"),
    ('[server]\nlog_level = "verbose"\n', "server.log_level", "'debug'"),
    ("[profiles.robot]\ndefault_k = 2.5\n", "profiles.robot.default_k", "expected an integer"),
])
def test_wrong_type_in_file(tmp_path: Path, text: str, key: str, expected: str) -> None:
    msg = error_of(write(tmp_path, text), env={})
    assert msg.startswith(f"{key}:") and expected in msg


def test_wrong_type_in_env_and_overrides() -> None:
    msg = error_of(env={"SNAPRAG__SERVER__PORT": "abc"})
    assert "server.port" in msg and "expected an integer" in msg
    msg = error_of(env={}, overrides=["rerank.enabled=yes"])
    assert "rerank.enabled" in msg and "expected true or false" in msg


def test_unknown_key_in_env_and_overrides() -> None:
    msg = error_of(env={"SNAPRAG__SERVER__PROT": "1"})
    assert "SNAPRAG__SERVER__PROT" in msg and "server.prot" in msg
    assert "'server.prot'" in error_of(env={}, overrides=["server.prot=1"])
    assert "'nope'" in error_of(env={}, overrides=["nope.port=1"])


def test_unknown_profile() -> None:
    msg = error_of(env={}, overrides=["profiles.kiosk.total_ms=100"])
    assert "unknown profile 'kiosk'" in msg and "robot, voice" in msg
    msg = error_of(env={"SNAPRAG__PROFILES__KIOSK__TOTAL_MS": "100"})
    assert "SNAPRAG__PROFILES__KIOSK__TOTAL_MS" in msg and "unknown profile 'kiosk'" in msg


@pytest.mark.parametrize("missing", ["voice", "robot"])
def test_missing_required_profile(missing: str) -> None:
    profiles = {"voice": ProfileConfig(), "robot": ProfileConfig()}
    del profiles[missing]
    with pytest.raises(ConfigError, match=rf"^profiles\.{missing}: missing"):
        Config(profiles=profiles).validate()


@pytest.mark.parametrize("reserve", ["150", "151"])
def test_fallback_reserve_must_be_below_total(reserve: str) -> None:
    msg = error_of(env={}, overrides=[f"profiles.robot.fallback_reserve_ms={reserve}"])
    assert msg.startswith("profiles.robot.fallback_reserve_ms") and "total_ms (150.0)" in msg


def test_fallback_reserve_check_in_file(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "[profiles.voice]\ntotal_ms = 10\nfallback_reserve_ms = 10\n"), env={})
    assert msg.startswith("profiles.voice.fallback_reserve_ms")


@pytest.mark.parametrize(("override", "key"), [
    ("profiles.voice.retrieve_ms=-1", "profiles.voice.retrieve_ms"),
    ("profiles.robot.default_k=0", "profiles.robot.default_k"),
    ("profiles.robot.default_k=101", "profiles.robot.default_k"),
    ("server.port=70000", "server.port"),
    ("server.cpu_workers=0", "server.cpu_workers"),
    ("knowledge_base.paths=[]", "knowledge_base.paths"),
    ("voice.early_retrieval_stability=1.5", "voice.early_retrieval_stability"),
])
def test_cross_field_checks_name_the_key(override: str, key: str) -> None:
    assert error_of(env={}, overrides=[override]).startswith(f"{key}:")


@pytest.mark.parametrize("item", ["server.port", "server.port 6000", ""])
def test_bad_set_syntax(item: str) -> None:
    msg = error_of(env={}, overrides=[item])
    assert f"--set {item!r}" in msg and "section.field=value" in msg


def test_non_existent_config_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    msg = error_of(path, env={})
    assert str(path) in msg and "does not exist" in msg
