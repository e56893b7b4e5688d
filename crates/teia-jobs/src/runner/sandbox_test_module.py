import os, socket, subprocess, sys, time, pytest

def test_no_network():
    s = socket.socket()
    s.settimeout(2)
    with pytest.raises(OSError):
        s.connect(('127.0.0.1', PORT))

def test_system_read_only():
    with pytest.raises(OSError):
        open('/usr/teia-probe', 'w')

def test_node_folder_hidden():
    assert not os.path.exists(SECRET)

def test_other_tasks_hidden():
    assert not os.path.exists(OTHER)
    assert os.listdir(os.path.dirname(TASK)) == [os.path.basename(TASK)]

def test_own_folder_writable():
    open('written.txt', 'w').write('ok')

def test_no_capabilities():
    status = open('/proc/self/status').read()
    for field in ('CapPrm', 'CapEff', 'CapBnd', 'CapAmb'):
        assert field + ':\t0000000000000000' in status, status

def test_remount_refused():
    done = subprocess.run(['mount', '-o', 'remount,rw,bind', '/'], capture_output=True)
    assert done.returncode != 0
    with pytest.raises(OSError):
        open('/usr/teia-probe', 'w')

def test_no_socket_inherited():
    for fd in os.listdir('/proc/self/fd'):
        try:
            target = os.readlink('/proc/self/fd/' + fd)
        except OSError:
            continue
        assert not target.startswith('socket:'), (fd, target)

def test_sees_only_its_processes():
    pids = [p for p in os.listdir('/proc') if p.isdigit()]
    assert len(pids) < 8, pids

def test_process_limit():
    if not LIMITED:
        return
    children = []
    try:
        for _ in range(300):
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
    except OSError:
        pass
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert len(children) < 300

def test_leaves_a_detached_child():
    code = 'import fcntl, time\nf = open("held.lock", "w")\nfcntl.flock(f, fcntl.LOCK_EX)\nopen("held.ready", "w").close()\ntime.sleep(300)\n'
    subprocess.Popen([sys.executable, '-c', code], start_new_session=True)
    while not os.path.exists('held.ready'):
        time.sleep(0.01)
