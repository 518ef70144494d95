"""The handlers behind each `kitfs` subcommand: parse arguments, run, print.

Each returns the exit status; failures are raised as KitfsError and turned
into one line by cli.main.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from kitfs.errors import KitfsError, UsageError, user_error
from kitfs.modelkit.filters import FilterSet
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import parse_reference
from kitfs.units import human_bytes

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    # Imported where used: `kitfs mount` starts two interpreters (the command and its
    # daemon), and what the command alone does not need is start-up time a user waits.
    from kitfs.inspection import Inspection
    from kitfs.modelkit.tree import Tree
    from kitfs.mounts import MountConfig, MountState, ReadyPipe

T = TypeVar("T")


def client_options(args: argparse.Namespace) -> ClientOptions:
    timeout = float(getattr(args, "timeout", 30.0))
    if timeout <= 0:
        raise UsageError("--timeout must be positive")
    return ClientOptions(
        plain_http=bool(getattr(args, "plain_http", False)),
        tls_verify=getattr(args, "tls_verify", "true") == "true",
        ca_file=getattr(args, "ca_file", None),
        cert_file=getattr(args, "cert", None),
        key_file=getattr(args, "key", None),
        read_timeout=timeout,
        retry_budget=timeout,
        kitops_home=getattr(args, "kitops_home", None),
    )


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run `fn` under trio, raising what failed as itself, not inside an exception group.

    A nursery anywhere below (layers inspected in parallel, pack's workers)
    wraps what fails in it in an ExceptionGroup; cli.main reports a KitfsError
    as one line but a group as an internal error, so a bad tar entry found
    while listing came out as exit 70 and "ExceptionGroup". The user's error
    is taken out of the group here, once for every command.
    """
    import trio

    try:
        return trio.run(fn)
    except BaseExceptionGroup as group:
        cause = user_error(group)
        if cause is group:
            raise
        raise cause from group


def cmd_pack(args: argparse.Namespace) -> int:
    from kitfs.pack import PackRequest, pack

    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    ref = parse_reference(args.tag)
    req = PackRequest(
        context=Path(args.directory), reference=ref, kitfile=args.file,
        compression=args.compression, work_dir=args.work_dir, jobs=args.jobs,
    )
    options = client_options(args)
    result = run_async(lambda: pack(req, options))
    size = sum(layer.blob_size for layer in result.layers)
    where = "kit local storage" if ref.is_local else ref.registry
    print(f"packed {len(result.layers)} layers ({human_bytes(size)}) to {where}")
    for tag in ref.tags:
        print(f"{ref.name}:{tag}@{result.digest}")
    return 0


async def _inspect(args: argparse.Namespace, tree_filters: FilterSet | None
                   ) -> tuple[Inspection, Tree | None]:
    from kitfs.inspection import build_file_tree, inspect
    from kitfs.oci.source import open_source

    ref = parse_reference(args.reference)
    source = open_source(ref, client_options(args))
    try:
        result = await inspect(source)
        tree = None
        if tree_filters is not None:
            tree = await build_file_tree(source, result, tree_filters)
        return result, tree
    finally:
        await source.aclose()


def _layer_rows(ins: Inspection) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for layer in ins.view.layers:
        toc = ins.toc.layer(layer.digest) if ins.toc is not None else None
        rows.append({
            "type": layer.kind, "path": layer.path, "name": layer.name,
            "mediaType": layer.media_type, "format": layer.fmt,
            "compression": layer.compression, "digest": layer.digest, "size": layer.size,
            "diffId": layer.diff_id, "files": None if toc is None else sum(
                1 for e in toc.entries if e.kind == "file"),
            "chunks": None if toc is None else len(toc.chunks),
        })
    return rows


def cmd_inspect(args: argparse.Namespace) -> int:
    from kitfs.modelkit.kitfile import kitfile_to_yaml

    ins, _ = run_async(lambda: _inspect(args, None))
    view = ins.view
    kitfile_yaml = kitfile_to_yaml(view.kitfile.without_layer_digests())
    if args.json:
        doc = {
            "reference": args.reference,
            "digest": ins.digest,
            "manifest": ins.manifest_json,
            "config": json.loads(ins.config) if ins.config and view.family == "kitops"
            else None,
            "kitfile": kitfile_yaml,
            "kitfileSource": view.kitfile_source,
            "layers": _layer_rows(ins),
            "tableOfContents": view.annotations.get("dev.kitfs.toc.digest"),
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    pkg = view.kitfile.package
    print(f"ModelKit    {args.reference}")
    print(f"Digest      {ins.digest}")
    kind = f"{view.family}" + (f", made by kit {view.cli_version}" if view.cli_version else "")
    print(f"Format      {kind}")
    if view.created:
        print(f"Created     {view.created}")
    if pkg.name or pkg.version:
        print(f"Package     {pkg.name} {pkg.version}".rstrip())
    total = sum(layer.size for layer in view.layers)
    print(f"Size        {human_bytes(total)} in {len(view.layers)} layers")
    toc = view.annotations.get("dev.kitfs.toc.digest")
    print("Index       " + (f"kitfs table of contents {toc}" if ins.toc else
                           "none (mounts read tar headers on demand)"))
    print("\nKitfile:")
    for line in kitfile_yaml.rstrip("\n").splitlines():
        print(f"  {line}")
    print("\nLayers:")
    rows = _layer_rows(ins)
    width = max([len(str(r["path"])) for r in rows] + [4])
    print(f"  {'TYPE':<9} {'PATH':<{width}} {'FORMAT':<9} {'SIZE':>10}  DIGEST")
    for r in rows:
        fmt = str(r["format"]) + ("" if r["compression"] == "none" else f"+{r['compression']}")
        print(f"  {r['type']!s:<9} {r['path']!s:<{width}} {fmt:<9} "
              f"{human_bytes(int(str(r['size']))):>10}  {str(r['digest'])[:19]}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    filters = FilterSet.parse(args.filter)
    _, tree = run_async(lambda: _inspect(args, filters))
    assert tree is not None
    if args.json:
        doc = [
            {"path": n.path, "type": n.kind, "mode": oct(n.mode), "size": n.size,
             "layer": n.layer, "offset": n.offset}
            for n in tree.walk()
        ]
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    for node in tree.walk():
        name = shown_path(node.path) + ("/" if node.kind == "dir" else "")
        if args.long:
            mode = stat.filemode((stat.S_IFDIR if node.kind == "dir" else stat.S_IFREG)
                                 | node.mode)
            layer = (node.layer or ("config" if node.inline is not None else ""))[:19]
            print(f"{mode} {node.size:>14} {layer:<19} {name}")
        else:
            size = "" if node.kind == "dir" else human_bytes(node.size)
            print(f"{size:>10}  {name}")
    files = sum(1 for _ in tree.files())
    print(f"{files} files, {human_bytes(tree.total_size)}")
    return 0


def shown_path(path: str) -> str:
    """A path as `ls` prints it, one line whatever it holds (`ls --json` keeps it exact).

    Tar names are bytes: those that are not UTF-8 arrive surrogate-escaped
    (as os.fsdecode gives them) and cannot be printed to a UTF-8 stdout;
    they are shown as \\xNN. Control characters are escaped too, so a newline
    cannot fake a second entry, nor an escape sequence rewrite the terminal;
    a backslash is doubled so the escaping stays unambiguous.
    """
    if path.isprintable() and "\\" not in path:
        return path
    out = []
    for ch in path:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(_ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x100 else
                                            f"\\u{code:04x}" if code < 0x10000 else
                                            f"\\U{code:08x}"))
    return "".join(out)


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def cmd_login(args: argparse.Namespace) -> int:
    from kitfs.oci.credentials import login

    if args.password_stdin and args.password is not None:
        raise UsageError("give either --password or --password-stdin, not both")
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif args.password is not None:
        password = args.password
    else:
        import getpass

        if not sys.stdin.isatty():
            raise UsageError("no password: use --password-stdin to read it from a pipe")
        password = getpass.getpass(f"Password for {args.username}@{args.registry}: ")
    if not password:
        raise UsageError("empty password")
    options = client_options(args)
    run_async(lambda: login(args.registry, args.username, password, options))
    print(f"Login succeeded: credentials for {args.registry} saved")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from kitfs.oci.credentials import remove_login

    if remove_login(args.registry, getattr(args, "kitops_home", None)):
        print(f"Removed credentials for {args.registry}")
    else:
        print(f"No credentials were saved for {args.registry}")
    return 0


def _mount_config(args: argparse.Namespace) -> MountConfig:
    from kitfs.mounts import MountConfig, absolute_mountpoint, default_cache_dir, log_path
    from kitfs.units import parse_size

    parse_reference(args.reference)  # a bad reference fails here, before anything starts
    FilterSet.parse(args.filter)
    cache_size = None
    if args.cache_size is not None and args.cache_size.lower() not in ("none", "unlimited"):
        cache_size = parse_size(args.cache_size)
    memory = parse_size(args.memory)
    if memory < 8 << 20:
        raise UsageError(f"--memory {args.memory}: at least 8M (a few chunks) is needed")
    mountpoint = absolute_mountpoint(args.mountpoint)
    options = client_options(args)
    return MountConfig(
        reference=args.reference, mountpoint=mountpoint,
        cache_dir=Path(os.path.abspath(Path(args.cache_dir).expanduser())) if args.cache_dir
        else default_cache_dir(),
        client=options, filters=tuple(args.filter), prefetch=args.prefetch,
        cache_size=cache_size, memory=memory, verify=args.verify, allow_other=args.allow_other,
        foreground=bool(args.foreground),
        request_timeout=options.read_timeout,
        log_file=log_path(mountpoint) if args.ready_fd is not None else None,
    )


def _daemon_argv(args: argparse.Namespace, config: MountConfig) -> list[str]:
    """The `kitfs mount --foreground` command line the background daemon runs."""

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path else None

    argv = ["mount", config.reference, str(config.mountpoint), "--foreground",
            "--cache-dir", str(config.cache_dir), "--prefetch", config.prefetch,
            "--verify", config.verify, "--timeout", repr(config.client.read_timeout),
            "--memory", str(config.memory),
            "--tls-verify", "true" if config.client.tls_verify else "false"]
    if config.cache_size is not None:
        argv += ["--cache-size", str(config.cache_size)]
    for text in config.filters:
        argv += ["--filter", text]
    if config.allow_other:
        argv.append("--allow-other")
    if config.client.plain_http:
        argv.append("--plain-http")
    for flag, value in (("--ca-file", config.client.ca_file), ("--cert", config.client.cert_file),
                        ("--key", config.client.key_file), ("--config", args.kitops_home)):
        if value:
            argv += [flag, str(absolute(value))]
    if args.verbose:
        argv.append("-" + "v" * args.verbose)
    return argv


def _print_mounted(state: MountState) -> None:
    print(f"mounted {state.reference} at {state.mountpoint}")
    print(f"  digest  {state.digest}")
    print(f"  files   {state.files} ({human_bytes(state.size)})")
    daemon = f"pid {state.pid}" + (f", log {state.log}" if state.log else "")
    print(f"  daemon  {daemon}")
    print(f"  cache   {state.cache_dir}")
    sys.stdout.flush()


def _daemon_logging(verbose: int, *, to_file: bool) -> None:
    """A daemon's log is for after the fact: INFO and up (mounts, unmounts, failures).

    Its own log file gets timestamps and the pid; stderr (a terminal, or the
    journal under systemd, which stamps lines itself) does not.
    """
    level = logging.DEBUG if verbose >= 2 else logging.INFO
    stamp = "%(asctime)s kitfs[%(process)d] " if to_file else "kitfs: "
    logging.basicConfig(
        force=True, level=level, format=stamp + "%(levelname)s: %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "pyfuse3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def cmd_mount(args: argparse.Namespace) -> int:
    from kitfs.mounts import ReadyPipe

    # A daemon (--ready-fd) reports every failure, even a bad argument, on the pipe
    # too, so that `kitfs mount` relays it as its own one-line error.
    pipe = ReadyPipe(args.ready_fd)
    try:
        return _mount(args, pipe)
    except KitfsError as exc:
        pipe.failed(exc.exit_code, str(exc))
        raise
    except BaseException as exc:
        pipe.failed(70, f"internal error: {type(exc).__name__}: {exc}")
        raise


def _mount(args: argparse.Namespace, pipe: ReadyPipe) -> int:
    from kitfs.mounts import check_mountpoint, start_daemon

    config = _mount_config(args)
    check_mountpoint(config.mountpoint)
    if not (args.foreground or args.ready_fd is not None):
        state, earlier = start_daemon(_daemon_argv(args, config), config.mountpoint)
        _print_mounted(state)
        if earlier is not None:
            print(f"  earlier log of the previous daemon here kept at {earlier}")
        return 0

    from kitfs.daemon import serve

    _daemon_logging(args.verbose, to_file=args.ready_fd is not None)

    def ready(state: MountState) -> None:
        if pipe.pending:
            pipe.ready()
        else:
            _print_mounted(state)

    run_async(lambda: serve(config, ready))
    pipe.failed(1, "the daemon stopped before the mount was ready")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from kitfs.mounts import absolute_mountpoint, umount

    print(umount(absolute_mountpoint(args.mountpoint), timeout=args.wait))
    return 0


def _status_doc(state: MountState, mounted: bool) -> dict[str, object]:
    return {
        "mountpoint": state.mountpoint, "reference": state.reference, "digest": state.digest,
        "pid": state.pid, "alive": state.alive, "mounted": mounted,
        "started": _iso(state.started), "updated": _iso(state.updated) if state.updated else None,
        "files": state.files, "size": state.size, "filters": state.filters,
        "cacheDir": state.cache_dir, "log": state.log, "status": state.status,
    }


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def _flatten(prefix: str, value: object, out: list[str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict):  # e.g. one line per layer
                fields = " ".join(f"{k}={v}" for k, v in item.items() if v not in (None, ""))
                out.append(f"{prefix}[{i}] {fields}")
            else:
                out.append(f"{prefix}[{i}]={item}")
    elif value is not None:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        out.append(f"{prefix}={shown}")


def cmd_status(args: argparse.Namespace) -> int:
    from kitfs.mounts import MountError, absolute_mountpoint, all_states, mount_table, read_state

    mounted = {m.mountpoint for m in mount_table()}
    if args.mountpoint:
        mountpoint = absolute_mountpoint(args.mountpoint)
        state = read_state(mountpoint)
        if state is None:
            raise MountError(f"no kitfs mount at {mountpoint}")
        states = [state]
    else:
        states = all_states()
    docs = [_status_doc(s, s.mountpoint in mounted) for s in states]
    if args.json:
        json.dump(docs, sys.stdout, indent=2)
        print()
        return 0
    if not docs:
        print("no kitfs mounts")
        return 0
    width = max(len("MOUNTPOINT"), *(len(str(d["mountpoint"])) for d in docs))
    print(f"{'MOUNTPOINT':<{width}}  {'STATE':<8} {'PID':>7}  {'FILES':>6} {'SIZE':>10}  "
          "REFERENCE")
    for d, s in zip(docs, states, strict=True):
        state_name = "mounted" if d["alive"] and d["mounted"] else (
            "starting" if d["alive"] else "dead")
        print(f"{s.mountpoint:<{width}}  {state_name:<8} {s.pid:>7}  {s.files:>6} "
              f"{human_bytes(s.size):>10}  {s.reference}")
    for s in states:
        counters: list[str] = []
        _flatten("", s.status, counters)
        print(f"\n{s.mountpoint}  {s.digest}")
        for line in counters:
            print(f"  {line}")
    return 0
