"""A stage process ends without Python's module teardown, but with everything its normal exit does."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROGRAM = textwrap.dedent("""
    import atexit, logging, sys, threading, time
    from pathlib import Path
    from stages.common import end_process

    out = Path(sys.argv[1])
    logging.basicConfig(filename=out / "log.txt", level=logging.INFO)
    logging.info("logged before the end")  # the file handler is flushed and closed by logging's atexit handler
    atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
    def late():
        time.sleep(0.5)
        (out / "thread.txt").write_text("joined")
    threading.Thread(target=late).start()  # not a daemon: the exit waits for it
    print("printed before the end", end="")  # no newline: stays in the buffer unless flushed
    end_process(3)
    (out / "after.txt").write_text("not reached")
""")


def test_end_process_keeps_the_exit_code_runs_atexit_and_joins_threads(tmp_path):
    result = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "printed before the end"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").read_text() == "joined"
    assert "logged before the end" in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "after.txt").exists()
