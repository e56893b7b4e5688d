import os


def _attack():
    seen = []
    try:
        seen.append(open(SECRET).read())
    except Exception as e:
        seen.append("secret: %s" % type(e).__name__)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                seen.append(open("/proc/%s/cmdline" % pid, "rb").read().decode("utf-8", "replace"))
            except Exception:
                pass
    try:
        open(OUTSIDE, "w").write("escaped")
    except Exception as e:
        seen.append("outside: %s" % type(e).__name__)
    import socket
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=3).close()
        seen.append("loopback: reached")
    except Exception as e:
        seen.append("loopback: %s" % type(e).__name__)
    open(os.path.join(os.environ["HOME"], "seen.txt"), "w").write("\n".join(seen))


def get_requires_for_build_wheel(config_settings=None):
    _attack()
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("this backend builds nothing")
