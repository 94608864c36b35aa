"""Uploading an adapter's files to `POST /admin/adapters` (gateway/api/upload.py) and the client side that
sends them (`lora-gateway adapters register`, `gateway.admin_client.register_folder`).

The gateway is a real one over HTTP on loopback, attached to an address where nothing listens:
registration validates against the base model's files, not against vLLM. Its allowed roots do not include
the client's folders, so, as for a gateway on another machine, only an upload can bring them in.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from gateway import admin_client
from gateway.admin_client import AdminError, is_loopback, register_folder, tar_folder
from gateway.cli import app
from tests.conftest import attached_settings, free_port, serve_app
from tests.registry_helpers import write_adapter

TOKEN = "upload-s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MAX_BYTES = 400_000


@pytest.fixture
def gw(cache_dir: Path, tiny_cache: dict[str, Path], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A gateway whose only allowed root is its own folder, and the data dir it keeps uploads under."""
    own = tmp_path / "gateway-side"
    own.mkdir()
    settings = attached_settings(
        f"http://127.0.0.1:{free_port()}",
        cache_dir,
        tmp_path,
        registry={"allowed_roots": [own], "seed_adapters_dir": False, "max_adapter_bytes": MAX_BYTES},
        auth={"admin_token": TOKEN},
    )
    with serve_app(settings, wait_ready=False) as url:
        yield url, settings.data_dir


@pytest.fixture
def folder(tiny_cache: dict[str, Path], tmp_path: Path) -> Path:
    """An adapter as training leaves it: the PEFT files and a report, outside the gateway's roots."""
    out = write_adapter(tiny_cache["base"], tmp_path / "client" / "out" / "sql", seed=71)
    (out / "training_report.json").write_text("{}")
    return out


def cli(url: str, *args: str, code: int = 0) -> Result:
    env = {"LORA_GATEWAY_URL": url, "LORA_GATEWAY_ADMIN_TOKEN": TOKEN}
    result = CliRunner().invoke(app, ["adapters", *args], env=env)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def folder_tar(folder: Path) -> bytes:
    buf = io.BytesIO()
    tar_folder(folder, buf)
    return buf.getvalue()


def post_tar(url: str, body: bytes, **params: str) -> httpx.Response:
    headers = {**AUTH, "content-type": "application/x-tar"}
    return httpx.post(f"{url}/admin/adapters", params=params, content=body, headers=headers, timeout=30)


def adapters(url: str) -> list[dict]:
    return httpx.get(f"{url}/admin/adapters", headers=AUTH, timeout=10).json()["data"]


def leftovers(data_dir: Path) -> list[str]:
    uploads = data_dir / "uploads"
    return sorted(os.listdir(uploads)) if uploads.is_dir() else []


def test_register_uploads_a_folder_the_gateway_cannot_read(
    gw: tuple[str, Path], folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, data_dir = gw
    elsewhere = tmp_path / "another-working-dir"
    (elsewhere / "out").mkdir(parents=True)
    (elsewhere / "out" / "sql").symlink_to(folder)
    monkeypatch.chdir(elsewhere)
    err = cli(url, "register", "sql", "out/sql", "--no-upload", code=1).stderr
    assert "(code: source_not_allowed, param: source)" in err, "by path the gateway refuses the folder"
    out = cli(url, "register", "sql", "out/sql", "--description", "trained here").stdout
    assert out.startswith("registered sql@1 (digest ") and "rank 8" in out
    v = json.loads(cli(url, "show", "sql", "--json").stdout)["versions"][0]
    assert v["source"] == f"upload:{os.uname().nodename}:{folder}" and v["description"] == "trained here"
    # The stored bytes are the folder's: the same digest as a registration by path would give.
    same = cli(url, "register", "sql", str(folder), "--upload").stdout
    assert f"digest {v['digest'][:12]}" in same
    assert leftovers(data_dir) == [], "the upload's temporary folder is removed"


def test_register_folder_always_uploads_to_a_gateway_elsewhere(
    gw: tuple[str, Path], folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = gw
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://localhost:1")
    assert is_loopback("http://[::1]:8000") and not is_loopback("https://gw.example.com")
    assert not is_loopback("http://10.0.0.7:8000")
    with pytest.raises(AdminError) as info:
        register_folder(url, TOKEN, "sql", folder, upload=False)
    assert info.value.code == "source_not_allowed"
    sent: list[dict] = []
    real_call = admin_client.call

    def recording_call(*args: object, **kw: object) -> object:
        sent.append({"json": kw.get("body"), "type": (kw.get("headers") or {}).get("content-type")})
        return real_call(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(admin_client, "call", recording_call)
    monkeypatch.setattr(admin_client, "is_loopback", lambda _: False)  # as if the gateway were elsewhere
    answer = register_folder(url, TOKEN, "sql", folder)
    assert answer["registered"]["source"].startswith("upload:")
    assert sent == [{"json": None, "type": "application/x-tar"}], "no path sent to another machine"
    with pytest.raises(AdminError) as info:
        register_folder(url, TOKEN, "sql", folder / "missing")
    assert info.value.code == "source_not_found"


def test_multipart_upload(gw: tuple[str, Path], folder: Path) -> None:
    url, _ = gw
    files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    r = httpx.post(
        f"{url}/admin/adapters",
        data={"name": "sql", "pin": "true", "origin": "laptop"},
        files=files,
        headers=AUTH,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    assert r.json()["registered"]["source"] == "upload:laptop" and r.json()["adapter"]["pinned"]
    twice = [*files, files[0]]
    r = httpx.post(f"{url}/admin/adapters", data={"name": "sql"}, files=twice, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_upload"
    r = httpx.post(f"{url}/admin/adapters", data={"name": "sql"}, headers=AUTH, timeout=30)
    assert r.status_code == 400, "a form without files is not an upload: read as JSON, refused"


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("members", "what"),
    [
        ([(_member("../adapter_config.json"), b"{}")], "a parent path"),
        ([(_member("/etc/adapter_config.json"), b"{}")], "an absolute path"),
        ([(_member("a/b/adapter_config.json"), b"{}")], "a nested path"),
        ([(_member("adapter_config.json", tarfile.SYMTYPE, "/etc/passwd"), None)], "a symlink"),
        ([(_member("adapter_config.json", tarfile.LNKTYPE, "/etc/passwd"), None)], "a hard link"),
        ([(_member("fifo", tarfile.FIFOTYPE), None)], "a FIFO"),
        ([(_member("x", tarfile.REGTYPE), b"1"), (_member("./x"), b"2")], "a name twice"),
        ([(_member("a/x"), b"1"), (_member("b/y"), b"2")], "two top folders"),
        ([(_member(".hidden"), b"1")], "a hidden file"),
        ([], "no files"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_hostile_tar_members_are_refused_and_nothing_is_kept(
    gw: tuple[str, Path], members: list[tuple[tarfile.TarInfo, bytes | None]], what: str
) -> None:
    url, data_dir = gw
    r = post_tar(url, tar_of(members), name="evil")
    assert r.status_code == 400, (what, r.text)
    assert r.json()["error"]["code"] == "invalid_upload", what
    assert adapters(url) == [] and leftovers(data_dir) == []


def test_upload_validated_as_a_local_folder(gw: tuple[str, Path], folder: Path) -> None:
    url, data_dir = gw
    pickle = [(_member(p.name), p.read_bytes()) for p in sorted(folder.iterdir())]
    pickle.append((_member("training_args.bin"), b"\x80\x04K\x01."))
    r = post_tar(url, tar_of(pickle), name="sql")
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsafe_file", r.text
    no_weights = [(_member("adapter_config.json"), (folder / "adapter_config.json").read_bytes())]
    r = post_tar(url, tar_of(no_weights), name="sql")
    assert r.status_code == 400, r.text
    r = post_tar(url, b"not a tar at all" * 100, name="sql")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_upload"
    r = post_tar(url, folder_tar(folder))  # no name
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    r = post_tar(url, folder_tar(folder), name="sql", colour="blue")
    assert r.status_code == 400, "unknown fields are refused, as in the JSON form"
    # In a top folder (`tar -cf - sql/`), gzip-compressed: accepted.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        archive.add(folder, arcname="sql")
    r = httpx.post(
        f"{url}/admin/adapters?name=sql",
        content=buf.getvalue(),
        headers={**AUTH, "content-type": "application/gzip"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    assert [a["name"] for a in adapters(url)] == ["sql"] and leftovers(data_dir) == []


def test_too_large_uploads_are_refused_while_they_stream(gw: tuple[str, Path], folder: Path) -> None:
    url, data_dir = gw
    big = tar_of([(_member("adapter_model.safetensors"), b"\0" * (MAX_BYTES + 1))])
    r = post_tar(url, big, name="big")
    assert r.status_code == 400 or r.status_code == 413, r.text
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(30):
            yield b"\0" * 65536

    headers = {**AUTH, "content-type": "application/x-tar"}
    r = httpx.post(f"{url}/admin/adapters?name=big", content=chunked(), headers=headers, timeout=30)
    assert r.status_code == 413, r.text
    # A declared length over the cap is refused before a byte of the body is read (none is sent here).
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /admin/adapters?name=big HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-tar\r\n"
            + f"authorization: Bearer {TOKEN}\r\ncontent-length: {10 * MAX_BYTES}\r\n\r\n".encode()
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
    assert adapters(url) == [] and leftovers(data_dir) == []


def test_an_upload_needs_the_admin_token_before_its_body_is_read(gw: tuple[str, Path], folder: Path) -> None:
    url, data_dir = gw
    r = httpx.post(
        f"{url}/admin/adapters?name=sql",
        content=folder_tar(folder),
        headers={"content-type": "application/x-tar"},
        timeout=30,
    )
    assert r.status_code == 401
    assert adapters(url) == [] and not (data_dir / "uploads").exists()
