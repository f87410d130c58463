"""Shared pytest configuration."""

import os

# The test bed starts its servers lazily, from the test process, with fork+exec (a pre-exec
# hook sets PR_SET_PDEATHSIG). Once a daemon or channel of an earlier test has started
# grpc's threads, grpc's fork handlers run in such a child and can abort it before the exec
# ("epoll_wait error: Bad file descriptor", exit -6: kube-scheduler failing to start). No
# test forks to go on using grpc, so grpc's fork support is off for the session (read when
# grpc initializes, i.e. at the first server or channel, after this).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
