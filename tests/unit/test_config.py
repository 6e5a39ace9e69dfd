import pytest

from mtckpt import CheckpointManager, ConfigError, LocalTier, MemoryTier, ObjectTier, config
from mtckpt.daemon import config as daemon_config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(every=0), r"memory.every must be a positive int"),
        (dict(every=True), r"memory.every must be a positive int"),
        (dict(interval=-1), r"memory.interval must be a positive number"),
        (dict(every=None, interval=None), r"set every .* and/or interval"),
        (dict(keep=0), r"memory.keep must be an int >= 1"),
        (dict(path=""), r"memory.path must be a non-empty path"),
    ],
)
def test_memory_tier_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MemoryTier(**kwargs)


def test_local_tier_needs_a_path_and_validates_keep():
    with pytest.raises(TypeError):
        LocalTier()
    with pytest.raises(ConfigError, match=r"local.keep must be an int >= 1, got 'two'"):
        LocalTier("/tmp/x", keep="two")


def test_schedules():
    tier = LocalTier("/x", every=10)
    assert [s for s in range(35) if config.is_due(tier, s, None)] == [0, 10, 20, 30]
    timed = LocalTier("/x", every=None, interval=60)
    assert config.is_due(timed, 7, None)  # nothing saved yet
    assert not config.is_due(timed, 8, 59.9)
    assert config.is_due(timed, 9, 60.0)
    both = LocalTier("/x", every=100, interval=60)
    assert (
        config.is_due(both, 200, 1.0)
        and config.is_due(both, 201, 61)
        and not config.is_due(both, 202, 1)
    )


def test_load_reads_toml_and_environment_overrides(tmp_path):
    path = tmp_path / "mtckpt.toml"
    path.write_text(
        'run = "exp1"\nthreads = 3\n[memory]\npath = "/dev/shm/a"\nkeep = 4\n'
        '[local]\npath = "/mnt/nvme"\nevery = 10\n'
    )
    kwargs = config.load(path, env={"MTCKPT_LOCAL_EVERY": "25", "MTCKPT_MEMORY_INTERVAL": "30.5"})
    assert kwargs["run"] == "exp1" and kwargs["threads"] == 3
    assert kwargs["memory"] == MemoryTier(path="/dev/shm/a", keep=4, interval=30.5)
    assert kwargs["local"] == LocalTier(path="/mnt/nvme", every=25)


def test_the_remote_tier_from_toml_and_environment(tmp_path):
    path = tmp_path / "mtckpt.toml"
    path.write_text(
        'run = "exp1"\n[remote]\nurl = "s3://bucket/prefix"\nevery = 100\nkeep_every = 1000\n'
        '[remote.storage_options]\nendpoint_url = "http://127.0.0.1:9000"\n'
    )
    env = {"MTCKPT_REMOTE_KEEP": "5", "MTCKPT_REMOTE_CONCURRENCY": "4",
           "MTCKPT_REMOTE_COMPRESSION": "zstd", "MTCKPT_REMOTE_COMPRESSION_LEVEL": "9"}  # fmt: skip
    kwargs = config.load(path, env=env)
    assert kwargs["remote"] == ObjectTier(
        url="s3://bucket/prefix", every=100, keep=5, keep_every=1000, concurrency=4,
        storage_options={"endpoint_url": "http://127.0.0.1:9000"}, compression="zstd",
        compression_level=9,
    )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"url": "bucket/prefix"}, r"remote.url must be a URL"),
        ({"url": "s3://b", "keep_every": 0}, r"remote.keep_every must be a positive int"),
        ({"url": "s3://b", "part_size": 1 << 20}, r"remote.part_size must be an int >= 5242880"),
        ({"url": "s3://b", "concurrency": 0}, r"remote.concurrency must be an int >= 1"),
        ({"url": "s3://b", "storage_options": "x"}, r"remote.storage_options must be a table"),
        ({"url": "s3://b", "every": None}, r"remote: set every"),
        ({"url": "s3://b", "compression": "gzip"}, r"remote.compression must be None or 'zstd'"),
        ({"url": "s3://b", "compression_level": 23}, r"remote.compression_level must be an int"),
        ({"url": "s3://b", "backlog": "fifo"}, r"remote.backlog must be 'newest' or 'queue'"),
    ],
)
def test_remote_tier_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ObjectTier(**kwargs)


def test_environment_alone_and_config_path_from_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('run = "from-file"\n')
    env = {
        "MTCKPT_CONFIG": str(path),
        "MTCKPT_LOCAL_PATH": str(tmp_path / "l"),
        "MTCKPT_LOCAL_EVERY": "none",
        "MTCKPT_LOCAL_INTERVAL": "5",
        "MTCKPT_ALLOW_PICKLE": "yes",
    }
    kwargs = config.load(None, env=env)
    assert kwargs["run"] == "from-file" and kwargs["allow_pickle"] is True
    assert kwargs["local"] == LocalTier(path=str(tmp_path / "l"), every=None, interval=5.0)
    assert config.load(None, env={"MTCKPT_RUN": "r"}) == {"run": "r"}


@pytest.mark.parametrize(
    "text, message",
    [
        ('run = "a"\nbogus = 1\n', r"unknown key 'bogus'"),
        ('run = "a"\n[memory]\nkepp = 2\n', r"unknown key memory.kepp"),
        ('run = "a"\nmemory = 3\n', r"\[memory\] must be a table"),
        ('run = "a"\n[local]\nevery = 10\n', r"\[local\] .*path"),
        ('run = "a"\n[memory]\nkeep = 0\n', r"memory.keep must be an int >= 1"),
        ('run = "a\n', r"not valid TOML"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(path, env={})


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MTCKPT_MEMORY_KEEP": "two"}, r"MTCKPT_MEMORY_KEEP='two' is not a valid int"),
        ({"MTCKPT_ALLOW_PICKLE": "maybe"}, r"MTCKPT_ALLOW_PICKLE='maybe' is not a valid bool"),
        ({"MTCKPT_LOCAL_INTERVAL": "soon"}, r"MTCKPT_LOCAL_INTERVAL='soon' is not a valid float"),
    ],
)
def test_bad_environment_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, env={"MTCKPT_RUN": "r", **env})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml", env={})


def test_from_config_builds_a_working_manager(tmp_path, shm_dir, monkeypatch):
    path = tmp_path / "mtckpt.toml"
    path.write_text(
        f'run = "cfg"\n[memory]\npath = "{shm_dir}"\nkeep = 1\n'
        f'[local]\npath = "{tmp_path / "local"}"\nevery = 2\n'
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with CheckpointManager.from_config(path) as mgr:
        for step in range(4):
            mgr.save(step, {"x": step}).wait()
        assert mgr.steps() == {"memory": [3], "local": [0, 2]}
    with pytest.raises(ConfigError, match="no run name"):
        CheckpointManager.from_config(None)


def test_manager_argument_validation(shm_dir):
    with pytest.raises(ConfigError, match="run name 'bad/run' is invalid"):
        CheckpointManager("bad/run", MemoryTier(str(shm_dir)))
    with pytest.raises(ConfigError, match="memory must be a mtckpt.MemoryTier"):
        CheckpointManager("r", memory=LocalTier(str(shm_dir)))
    with pytest.raises(ConfigError, match="chunk_size must be an int >= 4096"):
        CheckpointManager("r", MemoryTier(str(shm_dir)), chunk_size=10)
    with pytest.raises(ConfigError, match="give both rank and world_size"):
        CheckpointManager("r", MemoryTier(str(shm_dir)), rank=1)
    with pytest.raises(ValueError, match="rank 2 is out of range for world_size 2"):
        CheckpointManager("r", MemoryTier(str(shm_dir)), rank=2, world_size=2)


def test_daemon_settings_from_file_then_environment(tmp_path):
    path = tmp_path / "mtckpt.toml"
    path.write_text(
        'run = "exp"\n'
        '[memory]\npath = "/dev/shm/from-memory"\n'
        '[local]\npath = "/mnt/from-local"\n'
        '[daemon]\nnode_id = "file-node"\npeers = ["a:1", "b:2"]\nreplicas = 2\n'
        'bandwidth = 1000\nzone = "rack-a"\n'
    )
    assert config.load(path, env={})["run"] == "exp"  # the manager's loader skips [daemon]
    env = {"MTCKPT_CONFIG": str(path), "MTCKPT_DAEMON_REPLICAS": "3",
           "MTCKPT_DAEMON_PEERS": "c:3, d:4", "MTCKPT_NODE_ID": "env-node"}  # fmt: skip
    assert daemon_config.load_daemon(None, env=env) == {
        "node_id": "env-node",
        "peers": ["c:3", "d:4"],
        "replicas": 3,
        "bandwidth": 1000.0,
        "zone": "rack-a",
        "memory_root": "/dev/shm/from-memory",  # no memory_root: the memory tier's path
        "local_root": "/mnt/from-local",
    }
    assert daemon_config.load_daemon(None, env={"MTCKPT_DAEMON_MEMORY_ROOT": "/m"}) == {
        "memory_root": "/m"
    }
    path.write_text(
        '[local]\npath = "/l"\n[daemon]\npeers = "a:1,b:2"\nmemory_root = "/x"\nlocal_root = "/y"\n'
    )
    assert daemon_config.load_daemon(path, env={}) == {
        "peers": ["a:1", "b:2"],
        "memory_root": "/x",
        "local_root": "/y",
    }


@pytest.mark.parametrize(
    "text, env, message",
    [
        ("[daemon]\nreplica = 2\n", {}, r"unknown key daemon.replica; expected one of"),
        ('[daemon]\nreplicas = "two"\n', {}, r"daemon.replicas must be of type int, got 'two'"),
        ("[daemon]\nkeep = true\n", {}, r"daemon.keep must be of type int, got True"),
        ("[daemon]\npeers = [1, 2]\n", {}, r"daemon.peers must be a list of HOST:PORT"),
        ("daemon = 3\n", {}, r"\[daemon\] must be a table"),
        ("", {"MTCKPT_DAEMON_KEEP": "many"}, r"MTCKPT_DAEMON_KEEP='many' is not a valid int"),
    ],
)
def test_bad_daemon_settings_name_the_key(tmp_path, text, env, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        daemon_config.load_daemon(path, env=env)


def test_the_daemon_uploads_where_the_remote_table_says(tmp_path):
    path = tmp_path / "mtckpt.toml"
    path.write_text(
        '[daemon]\nmemory_root = "/dev/shm/m"\n'
        '[remote]\nurl = "s3://bucket/prefix"\nkeep = 5\ncompression = "zstd"\n'
    )
    assert daemon_config.load_daemon(path, env={})["remote"] == ObjectTier(
        url="s3://bucket/prefix", keep=5, compression="zstd"
    )
    moved = daemon_config.load_daemon(path, env={"MTCKPT_DAEMON_REMOTE": "file:///mnt/ckpt"})
    assert moved["remote"] == ObjectTier(url="file:///mnt/ckpt", keep=5, compression="zstd")
    path.write_text('[daemon]\nmemory_root = "/dev/shm/m"\n')
    assert "remote" not in daemon_config.load_daemon(path, env={})
