"""MatrixInfer's command line, local stack and test fixtures."""

import os

# The programs here start child processes (fork, then exec) from processes that have gRPC loaded.
# With gRPC's fork support on, its poller restarts in the forked child and can abort it with
# "epoll_wait error: Bad file descriptor" before the exec (grpc/grpc#43055): a child that died
# with SIGABRT at start was seen once in a clean-clone test run. The children are always other
# programs, so nothing needs gRPC across a fork: turn the support off before gRPC is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
