"""pytest-timeout's per-test limit, stretched as the waits inside the tests are.

`timeout` in pyproject.toml is what a test needs at most on an idle machine: the last line against
a hang. The waits inside the tests stretch once by the machine's measured slowness
(`tests.support.net.wait_until`); a fixed per-test limit would not, and a busy machine would fail
a test whose own waits still had time. So at the limit the timer measures how busy the machine is
(`tests.support.timing.slowness`) and, once, gives the test that much longer; a test still running
then is stuck: its threads' stacks are dumped and it fails, as pytest-timeout's signal method does.
Only the signal method is taken over (the one this suite uses); the thread method is left as it is.
"""

from __future__ import annotations

import faulthandler
import signal
import sys

import pytest

from tests.support.timing import slowness


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    if settings.method != "signal" or not settings.timeout or settings.timeout <= 0:
        return None
    limit = [float(settings.timeout)]
    stretched = [False]

    def expired(signum, frame):
        if not stretched[0]:
            stretched[0] = True
            factor = slowness()
            if factor > 1.05:
                more = settings.timeout * (factor - 1)
                limit[0] += more
                signal.setitimer(signal.ITIMER_REAL, more)
                return
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        pytest.fail(f"Timeout (>{limit[0]:.0f} s: {settings.timeout:g} s, stretched once by the "
                    "machine's measured slowness)", pytrace=False)

    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    item._stretching_timer = True
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item):
    if getattr(item, "_stretching_timer", False):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        return True
    return None
