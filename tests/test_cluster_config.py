"""Checks of the Ray cluster launcher configs (cluster.yaml, cluster-local.yaml) and docs/cluster.md.

Validation runs Ray's own code, offline:

* ``ray.autoscaler._private.util.prepare_config(config)`` (what ``ray up`` runs first) merges the
  provider's defaults.yaml, prepends ``setup_commands`` to the head/worker setup commands, checks the
  docker section and fills per-node-type ``min_workers``/``max_workers``; for ``type: local`` it
  first rewrites the config into Ray's single ``local.cluster.node`` type.  It contacts nothing: the
  AWS calls (IAM profile, key pair, subnets, security group, AMI) happen later, in the provider's
  ``bootstrap_config`` (``bootstrap_aws``), which needs boto3 and credentials and is not called here.
* ``ray.autoscaler._private.util.validate_config(config)`` validates against Ray's JSON schema
  (ray/autoscaler/ray-schema.json, via jsonschema) plus Ray's extra consistency checks.
* The inbound rules Ray would authorize on the AWS security group come from Ray's own
  ``_create_default_inbound_rules``.  Its module imports boto3 at the top; when boto3 is not
  installed the three pure rule-building functions are compiled from Ray's source file instead.
"""
from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = {"aws": REPO / "cluster.yaml", "local": REPO / "cluster-local.yaml"}
DOCS = REPO / "docs" / "cluster.md"
TOKEN_REMOTE_PATH = "~/.ray/auth_token"
WORKER_TYPES = ("gpu_1x", "gpu_4x")
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


# ---------------------------------------------------------------------------------------------
# helpers

@functools.lru_cache(maxsize=None)
def _raw(which: str) -> dict:
    return yaml.safe_load(CONFIG_FILES[which].read_text())


def raw(which: str) -> dict:
    return copy.deepcopy(_raw(which))


@functools.lru_cache(maxsize=None)
def _prepared(which: str) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(raw(which))
    validate_config(config)
    return config


def prepared(which: str) -> dict:
    return copy.deepcopy(_prepared(which))


def all_commands(config: dict) -> list[str]:
    return [cmd for key in COMMAND_LISTS for cmd in config.get(key, [])]


def ray_start_commands(config: dict, key: str) -> list[str]:
    found = [c for c in config[key] if re.search(r"\bray start\b", c)]
    assert found, f"{key} has no `ray start`"
    return found


def exported_env(command: str) -> dict[str, str]:
    """`export A=x B=y` assignments in a shell command (the form the start commands use)."""
    env: dict[str, str] = {}
    for match in re.finditer(r"\bexport\s+((?:[A-Z_][A-Z0-9_]*=[^\s;&|]+\s*)+)", command):
        for assignment in match.group(1).split():
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


def env_file_lines(config: dict) -> list[str]:
    """The lines setup_commands writes to ~/.sslrobust/env.sh (printf '%s\\n' 'line' ...)."""
    writer = [c for c in config["setup_commands"] if "~/.sslrobust/env.sh" in c and "printf" in c]
    assert len(writer) == 1, "exactly one setup command must write ~/.sslrobust/env.sh"
    return re.findall(r"'(export [^']*)'", writer[0])


@functools.lru_cache(maxsize=None)
def ray_inbound_rule_builder():
    try:
        from ray.autoscaler._private.aws.config import _create_default_inbound_rules

        return _create_default_inbound_rules
    except ImportError:  # boto3 is not a dependency of this project
        import ray.autoscaler._private as private

        source = Path(private.__file__).parent / "aws" / "config.py"
        tree = ast.parse(source.read_text())
        wanted = {
            "_create_default_inbound_rules",
            "_create_default_intracluster_inbound_rules",
            "_create_default_ssh_inbound_rules",
        }
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
        assert {f.name for f in functions} == wanted, "Ray's security group helpers moved"
        namespace = {"itertools": itertools}
        exec(compile(ast.Module(body=functions, type_ignores=[]), str(source), "exec"), namespace)
        return namespace["_create_default_inbound_rules"]


def project_packages() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return list(pyproject["tool"]["setuptools"]["packages"])


def joined_lines(text: str) -> list[str]:
    """Lines with shell continuations (backslash-newline) joined."""
    return text.replace("\\\n", " ").splitlines()


def docs_shell_lines() -> list[str]:
    """Command lines of the ```bash blocks of docs/cluster.md, heredoc bodies skipped."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", DOCS.read_text(), flags=re.S):
        heredoc_end = None
        for line in joined_lines(block):
            if heredoc_end is not None:
                if line.strip() == heredoc_end:
                    heredoc_end = None
                continue
            match = re.search(r"<<-?\s*'?(\w+)'?", line)
            if match:
                heredoc_end = match.group(1)
            lines.append(line.strip())
    return lines


def cli_flags(module_file: Path) -> set[str]:
    """Option strings given to argparse's add_argument in a module (read, not imported)."""
    flags = {"-h", "--help"}
    for node in ast.walk(ast.parse(module_file.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                    flags.add(arg.value)
    return flags


# ---------------------------------------------------------------------------------------------
# Ray's own validation

@pytest.mark.parametrize("which", sorted(CONFIG_FILES))
def test_ray_prepares_and_validates_the_config(which):
    config = prepared(which)  # prepare_config + validate_config; raises on any problem
    assert config["cluster_name"].startswith("sslrobust")
    assert config["head_node_type"] in config["available_node_types"]
    assert config["file_mounts"][TOKEN_REMOTE_PATH]


def test_schema_validation_really_runs():
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = prepared("aws")
    bad["not_a_ray_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = prepared("aws")
    bad["provider"]["security_group"]["FromPort"] = 8265  # only GroupName / IpPermissions allowed
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = prepared("aws")
    bad["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5  # resources are integers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


@pytest.mark.parametrize("which", sorted(CONFIG_FILES))
def test_every_command_is_valid_bash(which):
    for command in all_commands(prepared(which)):
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


# ---------------------------------------------------------------------------------------------
# network exposure

def test_aws_security_group_opens_only_ssh_inbound():
    config = prepared("aws")
    group = config["provider"]["security_group"]
    assert group["GroupName"] and group["GroupName"] != "ray-autoscaler-sslrobust"
    assert group.get("IpPermissions", []) == [], "no inbound rules beyond Ray's defaults"

    own_group = "sg-0123456789abcdef0"
    rules = ray_inbound_rule_builder()({own_group}, group.get("IpPermissions", []))
    from_outside = []
    for rule in rules:
        sources = {k for k in ("IpRanges", "Ipv6Ranges", "PrefixListIds") if rule.get(k)}
        pairs = rule.get("UserIdGroupPairs", [])
        assert all(p.get("GroupId") == own_group for p in pairs), rule  # only the cluster's own group
        if sources:
            from_outside.append(rule)
    assert from_outside, "Ray always opens SSH; the rule builder changed"
    for rule in from_outside:
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule


def test_no_node_type_bypasses_the_managed_security_group():
    for name, node_type in prepared("aws")["available_node_types"].items():
        node_config = node_type["node_config"]
        for key in ("SecurityGroupIds", "NetworkInterfaces", "LaunchTemplate"):
            assert key not in node_config, f"{name}: {key} would bypass the security group"


@pytest.mark.parametrize("which", sorted(CONFIG_FILES))
def test_dashboard_and_mlflow_listen_on_loopback_only(which):
    config = prepared(which)
    commands = all_commands(config)
    assert not any("0.0.0.0" in c for c in commands)
    head_start = " ".join(ray_start_commands(config, "head_start_ray_commands"))
    assert "--dashboard-host=127.0.0.1" in head_start

    mlflow = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(mlflow) == 1
    server_args = mlflow[0].split("mlflow server", 1)[1]
    assert re.findall(r"--host[ =](\S+)", server_args) == ["127.0.0.1"]
    assert re.findall(r"--port[ =](\S+)", server_args) == ["5000"]
    assert '--artifacts-destination "s3://$SSLROBUST_BUCKET/mlflow-artifacts"' in server_args
    backend = re.findall(r"--backend-store-uri[ =](\S+)", server_args)
    expected = "sqlite:////home/ubuntu/mlflow/mlflow.db" if which == "aws" else '"sqlite:///$HOME/mlflow/mlflow.db"'
    assert backend == [expected]
    assert any("http://127.0.0.1:5000/health" in c for c in config["head_start_ray_commands"])


@pytest.mark.parametrize("which", sorted(CONFIG_FILES))
def test_nothing_tracking_related_on_a_workers_start_path(which):
    """Trials never talk to MLflow: a worker joins whether or not MLflow is up (the joining itself,
    with no MLflow anywhere, is tests/test_cluster_worker_join.py)."""
    config = prepared(which)
    worker_path = [*config["setup_commands"], *config["worker_setup_commands"], *config["worker_start_ray_commands"]]
    for command in worker_path:
        # The mentions allowed: env.sh's variables (the default --tracking-uri, where the head backs up
        # its store), which nothing on a worker reads.
        command = re.sub(r"'export (MLFLOW_TRACKING_URI|SSLROBUST_MLFLOW_BACKUP)=[^']*'", "", command)
        assert not re.search(r"mlflow|:5000|ssh -N|tunnel", command, flags=re.I), command
    assert config["cluster_synced_files"] == []
    assert "tunnel" not in " ".join(config["head_setup_commands"])


@pytest.mark.parametrize("which", sorted(CONFIG_FILES))
def test_mlflow_store_is_restored_before_the_server_and_backed_up_every_10_minutes(which):
    config = prepared(which)
    start = config["head_start_ray_commands"]
    server = [c for c in start if "mlflow server" in c]
    assert len(server) == 1
    restore = server[0].index("scripts/mlflow_store.py restore ~/mlflow/mlflow.db")
    assert restore < server[0].index("exec mlflow server")
    backup_uri = '"$SSLROBUST_MLFLOW_BACKUP"'
    assert "export SSLROBUST_MLFLOW_BACKUP=s3://$SSLROBUST_BUCKET/mlflow-backup/mlflow.db" in env_file_lines(config)
    assert backup_uri in server[0]
    # the backup loop starts after the server (a new head restores before it can back up)
    loop = [i for i, c in enumerate(start) if "scripts/mlflow_store.py backup ~/mlflow/mlflow.db" in c]
    assert len(loop) == 1 and loop[0] > start.index(server[0])
    assert backup_uri in start[loop[0]] and "while sleep 600" in start[loop[0]]
    assert (REPO / "scripts" / "mlflow_store.py").is_file()


# ---------------------------------------------------------------------------------------------
# Ray token authentication

@pytest.mark.parametrize("which", sorted(CONFIG_FILES))
@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_token_auth_is_set_on_every_ray_start(which, key):
    config = prepared(which)
    for command in ray_start_commands(config, key):
        env = exported_env(command.split("ray start", 1)[0])
        assert env.get("RAY_AUTH_MODE") == "token", command
        assert env.get("RAY_AUTH_TOKEN_PATH") == "$HOME/.ray/auth_token", command
    # the token file is shipped to exactly the path the start commands point at
    assert TOKEN_REMOTE_PATH in config["file_mounts"]
    assert os.path.expanduser(config["file_mounts"][TOKEN_REMOTE_PATH]).endswith("ray_auth_token")
    assert any("chmod 600 ~/.ray/auth_token" in c for c in config["setup_commands"])


@pytest.mark.parametrize("which", sorted(CONFIG_FILES))
def test_interactive_shells_get_the_same_token_settings(which):
    lines = env_file_lines(prepared(which))
    assert "export RAY_AUTH_MODE=token" in lines
    assert "export RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in lines
    assert any(". ~/.sslrobust/env.sh" in c and "~/.bashrc" in c for c in raw(which)["setup_commands"])


def test_ray_reads_the_configured_token_env(tmp_path):
    """Run Ray's own token loader with exactly the env a worker's `ray start` gets."""
    config = prepared("aws")
    command = ray_start_commands(config, "worker_start_ray_commands")[0]
    home = tmp_path / "home"
    token_file = Path(TOKEN_REMOTE_PATH.replace("~", str(home)))
    token_file.parent.mkdir(parents=True)
    token_file.write_text("0123abcd" * 8 + "\n")  # a trailing newline, as `print` writes it

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    for key, value in exported_env(command.split("ray start", 1)[0]).items():
        env[key] = value.replace("$HOME", str(home))
    probe = (
        "import os\n"
        "from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, Config, get_authentication_mode\n"
        "loader = AuthenticationTokenLoader.instance()\n"
        "print(get_authentication_mode() == AuthenticationMode.TOKEN)\n"
        "print(loader.get_raw_token(ignore_auth_mode=False))\n"
        "os.environ.pop('RAY_AUTH_MODE')\n"
        "Config.initialize('')\n"
        "loader.reset_cache()\n"
        "print(get_authentication_mode() == AuthenticationMode.TOKEN)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    token_mode, token, mode_without_env = out.stdout.split()
    assert token_mode == "True"
    assert token == "0123abcd" * 8
    # Without RAY_AUTH_MODE a worker would not use token auth even with the file present: this is
    # why the start commands set it explicitly.
    assert mode_without_env == "False"


# ---------------------------------------------------------------------------------------------
# node types

def test_aws_node_types():
    config = prepared("aws")
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-east-1"
    assert config["provider"]["cache_stopped_nodes"] is True
    types = config["available_node_types"]
    assert set(types) == {config["head_node_type"], *WORKER_TYPES}

    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no trials on the head"
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be spot"
    assert head["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")

    for name in WORKER_TYPES:
        node_type = types[name]
        assert node_type["min_workers"] == 0 < node_type["max_workers"], name
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert node_type["resources"]["CPU"] > 0 and node_type["resources"]["GPU"] > 0, name
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert types["gpu_1x"]["resources"]["GPU"] == 1 and types["gpu_4x"]["resources"]["GPU"] == 4
    assert sum(types[n]["max_workers"] for n in WORKER_TYPES) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


def test_local_provider_layout():
    config = prepared("local")
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    assert config["auth"]["ssh_user"]
    head_start = " ".join(ray_start_commands(config, "head_start_ray_commands"))
    assert "--num-cpus=0" in head_start and "--num-gpus=0" in head_start


# ---------------------------------------------------------------------------------------------
# install

def test_both_configs_install_the_same_pinned_commit():
    aws, local = raw("aws"), raw("local")
    assert aws["setup_commands"] == local["setup_commands"]
    assert aws["head_setup_commands"] == local["head_setup_commands"]
    setup = " ".join(aws["setup_commands"])
    assert 'git clone "$SSLROBUST_REPO_URL"' in setup
    assert 'git checkout --quiet --detach "$SSLROBUST_COMMIT"' in setup
    # one environment on every node: the locked set, through the one install script, after the checkout
    install = [c for c in aws["setup_commands"] if "install_locked.sh" in c]
    assert len(install) == 1 and "bash ~/sslrobust/scripts/install_locked.sh cuda ~/sslrobust-venv" in install[0]
    assert aws["setup_commands"].index(install[0]) > next(
        i for i, c in enumerate(aws["setup_commands"]) if "git checkout" in c)
    assert not re.search(r"\bpip install\b|uv venv", setup), "nothing installed outside the lock"
    assert aws["worker_setup_commands"] == local["worker_setup_commands"] == []
    lines = env_file_lines(aws)
    for name in ("SSLROBUST_BUCKET", "SSLROBUST_REPO_URL", "SSLROBUST_COMMIT", "SSLROBUST_STUDIES_DIR"):
        assert any(line.startswith(f"export {name}=") for line in lines), name
    assert "export PATH=$HOME/sslrobust-venv/bin:$HOME/.local/bin:$PATH" in lines


def test_install_script_pins_the_interpreter_and_syncs_the_lock():
    from requirements import lockfile

    script = (REPO / "scripts" / "install_locked.sh").read_text()
    assert re.search(r"^UV_VERSION=\d+\.\d+\.\d+$", script, flags=re.M), "uv pinned to one release"
    assert 'uv pip sync --python "$VENV/bin/python" "$LOCK"' in script
    assert "--no-deps" in script
    for variant, path in lockfile.LOCKS.items():
        header = re.search(r"^# for CPython (\S+) ", path.read_text(), flags=re.M)
        assert header and header.group(1) == lockfile.PYTHON_VERSION, variant
    assert f"FROM ubuntu" in (REPO / "Dockerfile").read_text()
    assert "scripts/install_locked.sh" in (REPO / "Dockerfile").read_text()
    # the version the script reads from the lock header is the exact interpreter of the lock
    out = subprocess.run(["sed", "-n", r"s/^# for CPython \([0-9.]*\) .*/\1/p", str(lockfile.LOCKS["cuda"])],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == lockfile.PYTHON_VERSION


# ---------------------------------------------------------------------------------------------
# docs and commands

def test_python_modules_named_in_configs_and_docs_exist():
    packages = set(project_packages())
    texts = {p.name: p.read_text() for p in (*CONFIG_FILES.values(), DOCS)}
    named: dict[str, set[str]] = {}
    for name, text in texts.items():
        for module in re.findall(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)", text):
            named.setdefault(module, set()).add(name)
    assert {"orchestrator.study", "orchestrator.report"} <= set(named)
    for module, where in sorted(named.items()):
        if module.split(".")[0] in packages:
            base = REPO / Path(*module.split("."))
            assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file(), (
                f"{module} (named in {sorted(where)}) is not in the repository"
            )
        else:
            assert importlib.util.find_spec(module) is not None, f"{module} (in {sorted(where)})"


@pytest.mark.parametrize("module", ["orchestrator.study", "orchestrator.report"])
def test_docs_use_only_existing_cli_flags(module):
    base = REPO / Path(*module.split("."))
    source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "cli.py"  # a package: its cli
    assert source.is_file(), f"{source} is missing"
    flags = cli_flags(source)
    used = []
    for line in joined_lines(DOCS.read_text()):
        for invocation in re.findall(rf"python -m {re.escape(module)}\b([^'|&`]*)", line):
            used += re.findall(r"(?<!\S)(--?[A-Za-z][\w-]*)", invocation)
    assert used, f"docs never run {module}"
    unknown = sorted(set(used) - flags)
    assert not unknown, f"{module} has no {unknown}"


def test_docs_ray_commands_use_existing_subcommands_and_options():
    import click
    from ray.scripts.scripts import cli

    checked = 0
    for line in docs_shell_lines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        while tokens and re.fullmatch(r"[A-Za-z_]\w*=\S*", tokens[0]):
            tokens.pop(0)
        if not tokens or tokens[0] != "ray":
            continue
        command, i = cli, 1
        while isinstance(command, click.Group):
            assert i < len(tokens) and tokens[i] in command.commands, f"unknown ray command: {line}"
            command, i = command.commands[tokens[i]], i + 1
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
        for token in itertools.takewhile(lambda t: t != "--", tokens[i:]):
            if token.startswith("-") and token != "-":
                assert token.split("=", 1)[0] in options, f"`{token}` is not an option of: {line}"
        checked += 1
    assert checked >= 10


def test_docs_cover_the_workflow():
    text = DOCS.read_text()
    for snippet in (
        "ray up cluster.yaml",
        "ray down cluster.yaml",
        "~/.sslrobust/ray_auth_token",
        "RAY_AUTH_MODE=token",
        "ray job submit --address http://127.0.0.1:8265",
        "ray exec cluster.yaml",
        "--storage s3://$SSLROBUST_BUCKET/sslrobust",
        "--tracking-uri http://127.0.0.1:5000",
        "ray dashboard cluster.yaml",
        "ray status",
        "ray attach cluster.yaml -p 5000",
        "-L 5000:127.0.0.1:5000",
        "aws s3 sync s3://$SSLROBUST_BUCKET/sslrobust/results ./runs/results",
        "python -m orchestrator.report ablation --storage ./runs",
        "gpu: 0.5",
        "--max-concurrent",
        "cluster-local.yaml",
    ):
        assert snippet in text, snippet
    # the token file the docs create is the one cluster.yaml ships
    assert raw("aws")["file_mounts"][TOKEN_REMOTE_PATH] == "~/.sslrobust/ray_auth_token"
    assert raw("local")["file_mounts"][TOKEN_REMOTE_PATH] == "~/.sslrobust/ray_auth_token"


def test_docs_node_image_section_validates_with_ray():
    """The `docker:` block docs/cluster.md tells users to add to cluster.yaml passes Ray's validation,
    and the image it names is built by the Dockerfile through the same install script."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.S)]
    docker = [b["docker"] for b in blocks if isinstance(b, dict) and "docker" in b]
    assert len(docker) == 1
    config = raw("aws")
    config["docker"] = docker[0]
    config = prepare_config(config)
    validate_config(config)
    assert config["docker"]["image"] and config["docker"]["worker_run_options"] == ["--gpus all"]
    assert "--gpus all" not in config["docker"].get("run_options", [])  # the head has no GPU
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'RUN bash scripts/install_locked.sh "$VARIANT" /home/ubuntu/sslrobust-venv' in dockerfile
