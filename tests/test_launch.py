"""The TPU VM launch scripts (launch/*.sh), without a cloud: --dry-run must print exactly the
gcloud commands a real run would execute and execute nothing (a fake gcloud on PATH records any
call), the printed lines must paste back into a shell unchanged, the command that run.sh sends
to the workers must start the job detached with the right arguments, bad command lines must fail
with one line naming the flag, and shellcheck must find nothing."""

import glob
import os
import shlex
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "tail.sh", "delete.sh", "worker.sh"]
TPU = ["--name", "t1", "--zone", "us-east5-a"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--zone=us-east5-a"]

# Records its name and arguments (NUL-separated, one file per call, renamed into place whole so
# that a reader never sees half of one) and exits $FAKE_STATUS.
FAKE = """#!/bin/sh
f=$(mktemp "$FAKE_CALLS/partial.XXXXXX")
printf '%s\\0' "$(basename "$0")" "$@" > "$f"
mv "$f" "$FAKE_CALLS/call.${f##*.}"
exit "${FAKE_STATUS:-97}"
"""


@pytest.fixture
def env(tmp_path):
  """An environment whose gcloud and git are fakes that record every call and fail."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  calls.mkdir()
  for tool in ("gcloud", "git"):
    (bin_dir / tool).write_text(FAKE)
    (bin_dir / tool).chmod(0o755)
  return dict(
      os.environ,
      PATH=f"{bin_dir}:{os.environ['PATH']}",
      FAKE_CALLS=str(calls),
      TMPDIR=str(tmp_path),
  )


def calls(env):
  out = []
  for path in sorted(glob.glob(os.path.join(env["FAKE_CALLS"], "call.*"))):
    with open(path, "rb") as f:
      out.append(f.read().decode().split("\0")[:-1])
  return out


def launch(env, script, *args):
  return subprocess.run(
      [os.path.join(LAUNCH, script), *args], env=env, capture_output=True, text=True, timeout=60
  )


def dry(env, script, *args):
  """The commands `script --dry-run args` prints, each split as a shell would split it."""
  proc = launch(env, script, "--dry-run", *args)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ""
  assert calls(env) == [], "--dry-run ran a command"
  return [shlex.split(line) for line in proc.stdout.splitlines()]


# create


def test_create_on_demand(env):
  assert dry(env, "create.sh", *TPU, "--accelerator", "v5litepod-16", "--project", "my-proj") == [
      [
          *"gcloud compute tpus tpu-vm create t1".split(),
          "--version=v2-alpha-tpuv5-lite",
          "--accelerator-type=v5litepod-16",
          "--zone=us-east5-a",
          "--project=my-proj",
      ]
  ]


def test_create_spot(env):
  assert dry(env, "create.sh", *TPU, "--accelerator=v6e-8", "--spot") == [
      [
          *"gcloud compute tpus tpu-vm create t1".split(),
          "--version=v2-alpha-tpuv6e",
          "--accelerator-type=v6e-8",
          "--zone=us-east5-a",
          "--spot",
      ]
  ]


@pytest.mark.parametrize("spot", [False, True])
def test_create_queued(env, spot):
  args = [*TPU, "--accelerator", "v5p-16", "--queued"] + (["--spot"] if spot else [])
  assert dry(env, "create.sh", *args) == [
      [
          *"gcloud compute tpus queued-resources create t1".split(),
          "--node-id=t1",
          "--runtime-version=v2-alpha-tpuv5",
          "--accelerator-type=v5p-16",
          "--zone=us-east5-a",
      ]
      + (["--spot"] if spot else [])
  ]


@pytest.mark.parametrize(
    "accelerator, version",
    [("v4-32", "tpu-ubuntu2204-base"), ("v5p-8", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")],
)
def test_create_runtime_version(env, accelerator, version):
  (cmd,) = dry(env, "create.sh", *TPU, "--accelerator", accelerator)
  assert f"--version={version}" in cmd
  (cmd,) = dry(env, "create.sh", *TPU, "--accelerator", accelerator, "--runtime-version", "mine")
  assert "--version=mine" in cmd and f"--version={version}" not in cmd


def test_create_unknown_accelerator_needs_runtime_version(env):
  proc = launch(env, "create.sh", "--dry-run", *TPU, "--accelerator", "v9-8")
  assert proc.returncode == 2 and "--runtime-version" in proc.stderr
  assert dry(env, "create.sh", *TPU, "--accelerator", "v9-8", "--runtime-version", "v2-alpha")


# setup


def _jax_version():
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    (line,) = [l for l in f if l.startswith("jax==")]
  return line.strip().removeprefix("jax==")


INSTALL = (
    "sudo apt-get -q -o DPkg::Lock::Timeout=600 update; "
    "sudo apt-get -q -o DPkg::Lock::Timeout=600 install -y python3.11 python3.11-venv; "
    "python3.11 -m venv dqo_venv; dqo_venv/bin/pip install -q -U pip; "
    f"dqo_venv/bin/pip install -q -r dqo_jax/requirements.txt 'jax[tpu]=={_jax_version()}'"
)


def test_setup_copies_head_and_installs_on_every_worker(env):
  tarball = os.path.join(env["TMPDIR"], "dqo_jax-t1.tar.gz")
  assert dry(env, "setup.sh", *TPU) == [
      ["git", "-C", ROOT, "archive", "--format=tar.gz", "-o", tarball, "HEAD"],
      [
          *"gcloud compute tpus tpu-vm scp".split(),
          tarball,
          "t1:dqo_jax.tar.gz",
          "--zone=us-east5-a",
          "--worker=all",
      ],
      [
          *SSH,
          "--worker=all",
          "--command=set -e; rm -rf dqo_jax; mkdir dqo_jax; "
          "tar -xzf dqo_jax.tar.gz -C dqo_jax; " + INSTALL,
      ],
  ]


APT = "sudo apt-get -q -o DPkg::Lock::Timeout=600"
KEY = "/usr/share/keyrings/cloud.google.asc"


def _mount(bucket, mount_point):
  cache = f'"$HOME/gcsfuse_cache/{bucket}"'
  return (
      "--command=set -e; if ! command -v gcsfuse >/dev/null; then "
      f'echo "deb [signed-by={KEY}] https://packages.cloud.google.com/apt '
      'gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list '
      f">/dev/null; sudo curl -fsSL -o {KEY} https://packages.cloud.google.com/apt/doc/apt-key.gpg; "
      f"{APT} update; {APT} install -y gcsfuse; fi; "
      f"if mountpoint -q {mount_point}; then echo {mount_point} is mounted already; "
      f'else sudo mkdir -p {mount_point}; sudo chown "$(id -u):$(id -g)" {mount_point}; '
      f"mkdir -p {cache}; gcsfuse --implicit-dirs --rename-dir-limit=200000 "
      f"--metadata-cache-ttl-secs=0 --cache-dir={cache} --file-cache-max-size-mb=20480 "
      f"{bucket} {mount_point}; fi"
  )


def test_setup_mounts_the_bucket_on_every_worker(env):
  """--mount-bucket: one more command, after the install, that installs gcsfuse where it is
  missing and mounts the bucket where it is not mounted yet."""
  repo = ["--repo", "https://example.com/dqo.git"]
  install, mount = dry(env, "setup.sh", *TPU, *repo, "--mount-bucket", "my-b")
  assert install[-1].startswith("--command=set -e; rm -rf dqo_jax; git clone")
  assert mount == [*SSH, "--worker=all", _mount("my-b", "/gcs/my-b")]
  # gs:// and a trailing slash are forgiven; the mount point is quoted for the remote shell.
  args = [*TPU, *repo, "--mount-bucket=gs://my-b/", "--mount-point", "/mnt/my b", "--worker=1"]
  assert dry(env, "setup.sh", *args)[1] == [*SSH, "--worker=1", _mount("my-b", "'/mnt/my b'")]


MOUNT_FAKES = {
    # Mounted already when $FAKE_MOUNTED is set.
    "mountpoint": '#!/bin/sh\necho mountpoint "$@" >> "$FAKE_LOG"\n[ -n "$FAKE_MOUNTED" ]\n',
    "sudo": '#!/bin/sh\necho sudo "$@" >> "$FAKE_LOG"\n',
    "lsb_release": "#!/bin/sh\necho jammy\n",
}


@pytest.mark.parametrize("installed", [False, True])
@pytest.mark.parametrize("mounted", [False, True])
def test_the_remote_mount_command_is_idempotent(env, tmp_path, installed, mounted):
  """What setup.sh sends to a worker, run here with fakes for sudo, mountpoint and gcsfuse:
  gcsfuse is installed only where it is missing, and the bucket mounted only where it is not."""
  bin_dir, home, log = tmp_path / "fakes", tmp_path / "home", tmp_path / "log"
  bin_dir.mkdir()
  home.mkdir()
  fakes = dict(MOUNT_FAKES)
  if installed:
    fakes["gcsfuse"] = '#!/bin/sh\necho gcsfuse "$@" >> "$FAKE_LOG"\n'
  for name, text in fakes.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  (cmd,) = dry(env, "setup.sh", *TPU, "--repo", "r", "--mount-bucket", "bkt")[1:]
  remote = cmd[-1].removeprefix("--command=")
  # The fakes and the directories of the real tools the command needs (mkdir, id).
  path = ":".join([str(bin_dir), *{os.path.dirname(shutil.which(t)) for t in ("mkdir", "id")}])
  if not installed and shutil.which("gcsfuse", path=path):
    pytest.skip("a real gcsfuse is installed beside mkdir")
  run_env = dict(PATH=path, HOME=str(home), FAKE_LOG=str(log))
  if mounted:
    run_env["FAKE_MOUNTED"] = "1"
  proc = subprocess.run(
      ["bash", "-c", remote], env=run_env, capture_output=True, text=True, timeout=30
  )
  ran = log.read_text().splitlines()
  install = [
      "sudo tee /etc/apt/sources.list.d/gcsfuse.list",
      f"sudo curl -fsSL -o {KEY} https://packages.cloud.google.com/apt/doc/apt-key.gpg",
      f"{APT} update",
      f"{APT} install -y gcsfuse",
  ]
  cache = f"{home}/gcsfuse_cache/bkt"
  mount = [
      "sudo mkdir -p /gcs/bkt",
      f"sudo chown {os.getuid()}:{os.getgid()} /gcs/bkt",
      "gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0 "
      f"--cache-dir={cache} --file-cache-max-size-mb=20480 bkt /gcs/bkt",
  ]
  expected = ([] if installed else install) + ["mountpoint -q /gcs/bkt"]
  expected += [] if mounted else mount
  if not installed and not mounted:
    # The fake sudo installs nothing, so the mount fails for want of gcsfuse, as it should.
    expected = expected[:-1]
    assert proc.returncode == 127 and "gcsfuse" in proc.stderr
  else:
    assert proc.returncode == 0, proc.stderr
  assert ran == expected
  assert ("/gcs/bkt is mounted already" in proc.stdout) == mounted
  assert os.path.isdir(cache) != mounted


def test_setup_from_git(env):
  assert dry(env, "setup.sh", *TPU, "--repo", "https://example.com/dqo.git", "--ref", "v1") == [
      [
          *SSH,
          "--worker=all",
          "--command=set -e; rm -rf dqo_jax; git clone -q https://example.com/dqo.git dqo_jax; "
          "git -C dqo_jax checkout -q v1; " + INSTALL,
      ]
  ]


# run

RUN_ARGS = [
    *TPU,
    "--config",
    "configs/gsm8k.py:qwen2_7b",
    "--workdir=gs://b/runs/g1/",
    "--log-bucket",
    "gs://b/logs/",
    "--env",
    "A=x y",
    "--",
    "--config.dqo.beta=0.05",
    "--config.model.path=gs://b/it's here",
]


def test_run_starts_the_job_detached_on_every_worker(env):
  assert dry(env, "run.sh", *RUN_ARGS) == [
      [
          *SSH,
          "--worker=all",
          "--command=cd dqo_jax && { setsid nohup bash launch/worker.sh --log ../dqo_logs/g1.log "
          "--log-bucket gs://b/logs/g1 -- env PYTHONUNBUFFERED=1 'A=x y' ../dqo_venv/bin/python "
          "-m dqo_jax.main --config=configs/gsm8k.py:qwen2_7b --workdir=gs://b/runs/g1/ "
          "--config.dqo.beta=0.05 '--config.model.path=gs://b/it'\"'\"'s here' "
          ">/dev/null 2>&1 </dev/null & }",
      ]
  ]


def test_printed_commands_paste_back_unchanged(env):
  """The printed line run by bash gives gcloud the very arguments shlex reads from it."""
  proc = launch(env, "run.sh", "--dry-run", *RUN_ARGS)
  (line,) = proc.stdout.splitlines()
  subprocess.run(["bash", "-c", line], env=env, timeout=60)
  assert calls(env) == [["gcloud", *shlex.split(line)[1:]]]


PYTHON = """#!/bin/sh
printf '%s\\n' "$@" > {out}/argv
echo "A=$A PYTHONUNBUFFERED=$PYTHONUNBUFFERED" > {out}/env
echo hello from the job
i=0
while [ ! -e {out}/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
exit 3
"""


def _wait_for(predicate, seconds=30):
  deadline = time.time() + seconds
  while not predicate():
    assert time.time() < deadline, "timed out"
    time.sleep(0.1)


def test_the_remote_command_runs_the_job_and_logs(env, tmp_path):
  """What run.sh sends to a worker, run here in a fake home: the job gets exactly the config,
  workdir, overrides and environment, the command returns while the job runs, and the log (kept
  on the worker and copied to the bucket) ends with the job's exit status."""
  home, out = tmp_path / "home", tmp_path / "out"
  (home / "dqo_venv" / "bin").mkdir(parents=True)
  out.mkdir()
  shutil.copytree(LAUNCH, home / "dqo_jax" / "launch")
  python = home / "dqo_venv" / "bin" / "python"
  python.write_text(PYTHON.format(out=out))
  python.chmod(0o755)
  (cmd,) = dry(env, "run.sh", *RUN_ARGS)
  remote = cmd[-1].removeprefix("--command=")

  env = dict(env, FAKE_STATUS="0")  # here gcloud (storage cp) is meant to be called
  proc = subprocess.run(["bash", "-c", remote], cwd=home, env=env, timeout=30)
  assert proc.returncode == 0
  log = home / "dqo_logs" / "g1.log"
  _wait_for(lambda: (out / "env").exists() and "hello" in log.read_text())
  assert "exit status" not in log.read_text()  # returned while the job runs
  assert (out / "argv").read_text().splitlines() == [
      "-m",
      "dqo_jax.main",
      "--config=configs/gsm8k.py:qwen2_7b",
      "--workdir=gs://b/runs/g1/",
      "--config.dqo.beta=0.05",
      "--config.model.path=gs://b/it's here",
  ]
  assert (out / "env").read_text() == "A=x y PYTHONUNBUFFERED=1\n"
  assert os.path.realpath(home / "dqo_logs" / "latest.log") == str(log)

  (out / "go").touch()
  _wait_for(lambda: "exit status 3" in log.read_text())
  dest = f"gs://b/logs/g1/{os.uname().nodename}.log"
  copy = ["gcloud", "storage", "cp", "--quiet", "../dqo_logs/g1.log", dest]
  _wait_for(lambda: len(calls(env)) >= 2)  # at least one copy while it runs and one at the end
  assert all(c == copy for c in calls(env))


# tail, delete


def test_tail(env):
  assert dry(env, "tail.sh", *TPU) == [
      [*SSH, "--worker=0", "--command=tail -n 100 -F dqo_logs/latest.log"]
  ]
  assert dry(env, "tail.sh", *TPU, "--worker", "3", "--run", "g1", "--lines", "5") == [
      [*SSH, "--worker=3", "--command=tail -n 5 -F dqo_logs/g1.log"]
  ]


def test_delete(env):
  assert dry(env, "delete.sh", *TPU, "--project", "p") == [
      "gcloud compute tpus tpu-vm delete t1 --zone=us-east5-a --project=p".split()
  ]
  assert dry(env, "delete.sh", *TPU, "--queued", "--yes") == [
      "gcloud compute tpus queued-resources delete t1 --zone=us-east5-a --force --quiet".split()
  ]


@pytest.mark.parametrize(
    "script, args",
    [
        ("create.sh", [*TPU, "--accelerator", "v5p-16", "--queued", "--spot"]),
        ("setup.sh", [*TPU, "--repo", "r", "--mount-bucket", "bkt"]),
        ("run.sh", RUN_ARGS),
        ("tail.sh", TPU),
        ("delete.sh", [*TPU, "--queued"]),
    ],
)
def test_a_real_run_runs_what_dry_run_prints(env, script, args):
  printed = dry(env, script, *args)
  proc = launch(dict(env, FAKE_STATUS="0"), script, *args)
  assert proc.returncode == 0, proc.stderr
  assert sorted(calls(env)) == sorted(printed)  # the call files' names do not keep the order,
  assert proc.stderr == "".join(f"+ {shlex.join(c)}\n" for c in printed)  # the echoes do


def test_a_failing_gcloud_fails_the_script(env):
  assert launch(env, "delete.sh", *TPU).returncode == 97


# command lines


@pytest.mark.parametrize(
    "script, args, flag",
    [
        ("create.sh", ["--zone", "z", "--accelerator", "v5p-8"], "--name"),
        ("create.sh", ["--name", "t1", "--accelerator", "v5p-8"], "--zone"),
        ("create.sh", TPU, "--accelerator"),
        ("setup.sh", ["--zone", "z"], "--name"),
        ("run.sh", [*TPU, "--workdir", "/gcs/b/r"], "--config"),
        ("run.sh", [*TPU, "--config", "configs/arith.py"], "--workdir"),
        ("tail.sh", ["--name", "t1"], "--zone"),
        ("delete.sh", ["--zone", "z", "--queued"], "--name"),
        ("worker.sh", ["--", "true"], "--log"),
    ],
)
def test_missing_flag_is_one_line_naming_it(env, script, args, flag):
  proc = launch(env, script, "--dry-run", *args)
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert len(proc.stderr.splitlines()) == 1 and f"{flag} is required" in proc.stderr
  assert calls(env) == []


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("create.sh", [*TPU, "--acelerator", "v5p-8"], "unknown flag --acelerator"),
        ("create.sh", [*TPU, "--accelerator"], "--accelerator needs a value"),
        ("run.sh", [*TPU, "--config", "c", "--workdir", "/w", "--worker", "x"], "--worker must"),
        ("run.sh", [*TPU, "--config", "c", "--workdir", "/w", "--env", "oops"], "KEY=VALUE"),
        ("run.sh", [*TPU, "--config", "c", "--workdir", "runs/a"], "must be an absolute path"),
        ("run.sh", [*TPU, "--config", "c", "--workdir", "s3://b/r"], "gs://BUCKET/PATH or a path"),
        ("run.sh", [*TPU, "--config", "c", "--workdir", "/w", "--log-bucket", "b"], "gs://"),
        ("setup.sh", [*TPU, "--ref", "v1"], "--ref needs --repo"),
        ("setup.sh", [*TPU, "--mount-point", "/m"], "--mount-point needs --mount-bucket"),
        ("setup.sh", [*TPU, "--mount-bucket", "My_Bucket"], "takes a bucket name"),
        ("setup.sh", [*TPU, "--mount-bucket", "gs://b/dir"], "takes a bucket name"),
        ("setup.sh", [*TPU, "--mount-bucket", "bkt", "--mount-point", "m"], "absolute path"),
        ("tail.sh", [*TPU, "extra"], "unexpected argument extra"),
    ],
)
def test_bad_command_line(env, script, args, message):
  proc = launch(env, script, "--dry-run", *args)
  assert (proc.returncode, proc.stdout) == (2, "")
  assert message in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(env, script):
  proc = launch(env, script, "--help")
  assert proc.returncode == 0
  assert proc.stdout.startswith(f"Usage: launch/{script} ")
  assert "set -e" not in proc.stdout  # the header comment only
  if script != "worker.sh":
    assert "--dry-run" in proc.stdout
  assert calls(env) == []


def test_shellcheck_is_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck: see the README)")
  scripts = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")))
  assert len(scripts) == len(SCRIPTS) + 1  # and common.sh
  # It does catch a mistake here: an unquoted variable.
  bad = subprocess.run(
      ["shellcheck", "-"], input="#!/bin/bash\nrm $1\n", capture_output=True, text=True
  )
  assert bad.returncode != 0 and "SC2086" in bad.stdout
  proc = subprocess.run(["shellcheck", *scripts], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout
