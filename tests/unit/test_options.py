"""Options are declared once (mtckpt.options): the manager's signature, the loaders and the
configuration reference follow the declarations, and each rule's message names the option,
what it must be and the value given."""

import dataclasses
import inspect

import pytest

from mtckpt import CheckpointManager, ConfigError, config, options
from mtckpt.daemon import config as daemon_config


def test_the_managers_keyword_arguments_are_its_declared_options():
    params = inspect.signature(CheckpointManager.__init__).parameters
    keywords = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    declared = {f.name: f.default for f in dataclasses.fields(config.ManagerOptions)}
    assert "run" in params and declared.pop("run") is dataclasses.MISSING
    assert keywords == declared


@pytest.mark.parametrize(
    "cls", [config.ManagerOptions, daemon_config.DaemonConfig, *config.TIER_CLASSES.values()]
)
def test_every_option_says_what_it_means_and_has_one_type(cls):
    kinds = options.kinds(cls)
    for field in dataclasses.fields(cls):
        assert len(options.help_of(field)) >= 15, f"{cls.__name__}.{field.name}"
        assert kinds[field.name].base in (str, int, float, bool, dict, list)


def test_a_rule_names_the_option_what_it_must_be_and_the_value():
    with pytest.raises(ConfigError, match=r"^collective_timeout must be > 0 seconds, got 0$"):
        config.ManagerOptions("run", collective_timeout=0)
    with pytest.raises(ConfigError, match=r"^remote.concurrency must be an int >= 1, got True$"):
        config.ObjectTier(url="s3://b", concurrency=True)
    with pytest.raises(ConfigError, match=r"^peers.token_file must be a non-empty path or None"):
        config.PeerTier(token_file="")
    with pytest.raises(ConfigError, match=r"^staging must be 'blocking' or 'async', got 'x'$"):
        CheckpointManager("run", staging="x")


def test_optional_fields_take_none_from_the_environment(tmp_path):
    env = {"MTCKPT_RUN": "r", "MTCKPT_THREADS": "none", "MTCKPT_REMOTE_URL": "s3://b",
           "MTCKPT_REMOTE_KEEP_EVERY": "", "MTCKPT_LOCAL_PATH": str(tmp_path),
           "MTCKPT_LOCAL_INTERVAL": "2.5"}  # fmt: skip
    loaded = config.load(env=env)
    assert loaded["threads"] is None and loaded["remote"].keep_every is None
    assert loaded["local"].interval == 2.5
    with pytest.raises(ConfigError, match="MTCKPT_CHUNK_SIZE='none' is not a valid int"):
        config.load(env={"MTCKPT_CHUNK_SIZE": "none"})


def test_the_daemons_flags_are_its_declared_options():
    from mtckpt import cli

    (commands,) = [a for a in cli.parser()._actions if a.choices and "daemon" in a.choices]
    daemon = commands.choices["daemon"]
    flags = {a.dest: a for a in daemon._actions if a.option_strings and a.dest != "help"}
    assert set(flags) - {"config"} == {
        f.name for f in dataclasses.fields(daemon_config.DaemonConfig)
    }
    assert flags["keep"].type is int and flags["bandwidth"].type is float
    assert flags["replicas"].help == (
        "Copies of each shard on peers: the same as redundancy `replicas:N`. (1)"
    )
    assert flags["insecure"].const is True and flags["insecure"].default is None
