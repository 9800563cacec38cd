"""The upstream images the stack is built on, or stand-ins for them where no registry answers.

The Dockerfiles start FROM python:3.11-slim, and compose runs prom/prometheus and
grafana/grafana. ``provide`` keeps what the engine already has and pulls what it can.
What cannot be pulled is built here from Debian's packages and tagged with the upstream
name, so the Dockerfiles and docker-compose.yml run unchanged:

* a minimal Debian bookworm (mmdebstrap), imported as ``BASE``;
* python:3.11-slim from standins/python.Containerfile (Debian's Python 3.11.2);
* prom/prometheus:<compose's tag> from standins/prometheus.Containerfile (Debian's 2.42).

A stand-in carries the label ``STANDIN_LABEL``, which says what it really is. Stand-ins
check the wiring (Dockerfiles, compose, healthchecks, networks, ports, volumes), not the
upstream images: where a registry answers, the upstream images are used. Grafana has no
Debian package to build one from: without its image the stack runs without Grafana
(containers/compose.without-grafana.yml).

`python -m containers.standins` does the same on the engine of DOCKER_HOST.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import requests
import yaml

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
BASE = "localhost/smart-grid-load-balancer/debian-base:bookworm"
STANDIN_LABEL = "org.smart-grid-load-balancer.stand-in"
# The digest of the Containerfile a stand-in was built from: a changed Containerfile builds it again.
SOURCE_LABEL = "org.smart-grid-load-balancer.stand-in.source"
# Upstream repository -> the Containerfile of its stand-in.
CONTAINERFILES = {"python": HERE / "standins" / "python.Containerfile",
                  "prom/prometheus": HERE / "standins" / "prometheus.Containerfile"}  # fmt: skip
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the stand-ins need of Debian beyond minbase: Python with venv and pip, CA certificates for
# pip, useradd for the Dockerfiles, and wget for Prometheus's healthcheck.
BASE_PACKAGES = ["python3", "python3-venv", "python3-pip", "ca-certificates", "passwd", "wget"]
# Documentation and translations are of no use in an image.
BASE_EXCLUDES = ["/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*"]
# The host's own certificate authorities beyond Debian's (a TLS-inspecting proxy's, say).
HOST_EXTRA_CAS = Path("/usr/local/share/ca-certificates")
BUILD_TIMEOUT = 600


class StandinError(RuntimeError):
    """A base image could be neither pulled nor built; the message says what to do."""


@dataclass(frozen=True)
class BaseImage:
    """An image the project's files name but do not build, and how this engine came to have it."""

    name: str
    # "present", "pulled", "built" (a stand-in), or "unavailable"
    how: str
    # What the stand-in really is (its STANDIN_LABEL), None for an upstream image.
    standin: str | None = None

    def describe(self) -> str:
        what = f"stand-in: {self.standin}" if self.standin else "upstream image"
        return f"{self.name}: {self.how}" + ("" if self.how == "unavailable" else f" ({what})")


def upstream_images(repo_root: Path = REPO_ROOT) -> list[str]:
    """Images the project starts from: the Dockerfiles' FROM, and compose's images that no service builds."""
    services = yaml.safe_load((repo_root / "docker-compose.yml").read_text())["services"]
    built = {service["image"] for service in services.values() if "build" in service and "image" in service}
    names: list[str] = []
    for service in services.values():
        if "build" in service:
            dockerfile = repo_root / service["build"].get("context", ".") / service["build"]["dockerfile"]
            stages: set[str] = set()
            for match in re.finditer(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile.read_text(), re.M | re.I):
                if match.group(1) not in stages:
                    names.append(match.group(1))
                if match.group(2):
                    stages.add(match.group(2))
        elif service["image"] not in built:
            names.append(service["image"])
    return list(dict.fromkeys(names))


def repository(name: str) -> str:
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def provide(client: docker.DockerClient, log: Callable[[str], None], repo_root: Path = REPO_ROOT) -> list[BaseImage]:
    """Every upstream image on ``client``'s engine: kept, pulled, built as a stand-in, or
    reported unavailable (there is no stand-in for it)."""
    provided: list[BaseImage] = []
    to_build: list[str] = []
    for name in upstream_images(repo_root):
        try:
            present = client.images.get(name)
        except docker.errors.ImageNotFound:
            present = None
        if present is not None and not _outdated(present, name):
            provided.append(BaseImage(name, "present", _standin_label(present)))
            continue
        if present is not None:
            log(f"{name}: its stand-in's Containerfile changed")
            to_build.append(name)
            continue
        log(f"pulling {name}")
        if (error := _pull(client, name)) is None:
            provided.append(BaseImage(name, "pulled", _standin_label(client.images.get(name))))
            continue
        log(f"cannot pull {name}: {error}")
        if repository(name) in CONTAINERFILES:
            to_build.append(name)
        else:
            provided.append(BaseImage(name, "unavailable"))
    if to_build:
        with tempfile.TemporaryDirectory(prefix="standins-") as workdir:
            _ensure_base(client, Path(workdir), log)
            for name in to_build:
                provided.append(BaseImage(name, "built", _build_standin(client, name, Path(workdir), log)))
    return provided


def _pull(client: docker.DockerClient, name: str) -> str | None:
    """Pull ``name``; None when it came, else the registry's (or the engine's) first word on why not."""
    try:
        for event in client.api.pull(name, stream=True, decode=True):
            if "error" in event:
                return _first_line(event["error"])
    except (docker.errors.APIError, requests.RequestException) as exc:
        return _first_line(exc)
    return None


def _source_digest(name: str) -> str:
    return hashlib.sha256(CONTAINERFILES[repository(name)].read_bytes()).hexdigest()


def _outdated(image: docker.models.images.Image, name: str) -> bool:
    """A stand-in built from another version of its Containerfile (an upstream image never is)."""
    labels = image.labels or {}
    return STANDIN_LABEL in labels and labels.get(SOURCE_LABEL) != _source_digest(name)


def _standin_label(image: docker.models.images.Image) -> str | None:
    return (image.labels or {}).get(STANDIN_LABEL)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _ensure_base(client: docker.DockerClient, workdir: Path, log: Callable[[str], None]) -> None:
    try:
        client.images.get(BASE)
        return
    except docker.errors.ImageNotFound:
        pass
    if shutil.which("mmdebstrap") is None:
        raise StandinError(
            "No registry answers, and the stand-in images need mmdebstrap: `make install-test` installs it "
            "(or: apt-get install mmdebstrap)."
        )
    rootfs = workdir / "debian-base.tar"
    log(f"building {BASE} with mmdebstrap from {DEBIAN_MIRROR}")
    command = [
        "mmdebstrap", "--quiet", "--variant=minbase",
        # Merged /usr without the usrmerge package (and the Perl it needs).
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in BASE_EXCLUDES),
        f"--include={','.join(BASE_PACKAGES)}",
        "bookworm", str(rootfs), DEBIAN_MIRROR,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if result.returncode != 0:
        raise StandinError(
            f"mmdebstrap could not build the stand-ins' Debian base (exit {result.returncode}); is {DEBIAN_MIRROR} "
            f"reachable? (DEBIAN_MIRROR chooses another.)\n{result.stderr[-3000:]}"
        )
    # The whole name as the repository: podman's API ignores a separate tag on import.
    client.api.import_image_from_file(str(rootfs), repository=BASE)
    rootfs.unlink()


def _build_standin(client: docker.DockerClient, name: str, workdir: Path, log: Callable[[str], None]) -> str:
    log(f"building the stand-in for {name}")
    context = workdir / repository(name).replace("/", "-")
    (context / "ca-certificates").mkdir(parents=True)
    shutil.copy(CONTAINERFILES[repository(name)], context / "Containerfile")
    for certificate in HOST_EXTRA_CAS.glob("*.crt"):
        shutil.copy(certificate, context / "ca-certificates")
    try:
        image, _ = client.images.build(
            path=str(context), dockerfile="Containerfile", tag=name, rm=True, pull=False,
            labels={SOURCE_LABEL: _source_digest(name)},
        )  # fmt: skip
    except docker.errors.BuildError as exc:
        output = "".join(str(entry.get("stream", entry.get("error", ""))) for entry in exc.build_log)
        raise StandinError(f"the stand-in for {name} did not build: {exc.msg}\n{output[-3000:]}") from exc
    return _standin_label(image) or "a stand-in"


def main() -> int:
    for image in provide(docker.from_env(timeout=BUILD_TIMEOUT), lambda line: print(line, flush=True)):
        print(image.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
