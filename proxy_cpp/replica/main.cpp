// tokenbus-replica --listen 127.0.0.1:0 --replica-id ID --req-ring M,D,S --resp-ring M,D,S
// Prints "LISTENING host:port" on stdout once serving; logs go to stderr. Exits 0 after SIGTERM/SIGINT
// (open streams get 10 s to finish), 1 when the model worker is gone, 2 on bad arguments or rings.
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

#include "common/abseil.hpp"
#include "common/log.hpp"
#include "replica/replica_server.hpp"

namespace {

using tokenbus::LogLevel;
using tokenbus::log;

constexpr auto kShutdownGrace = std::chrono::seconds(10);

int usage(const char* problem) {
  std::fprintf(stderr,
               "tokenbus-replica: %s\n"
               "usage: tokenbus-replica --listen HOST:PORT --replica-id ID --req-ring MEM,DATA,SPACE "
               "--resp-ring MEM,DATA,SPACE\n",
               problem);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  tokenbus::disable_abseil_deadlock_detection();
  tokenbus::replica::ReplicaOptions options;
  std::string req_ring, resp_ring;
  for (int i = 1; i < argc; i += 2) {
    const std::string_view flag = argv[i];
    if (i + 1 >= argc) return usage(("missing value for " + std::string(flag)).c_str());
    const char* value = argv[i + 1];
    if (flag == "--listen") {
      options.listen = value;
    } else if (flag == "--replica-id") {
      options.replica_id = value;
    } else if (flag == "--req-ring") {
      req_ring = value;
    } else if (flag == "--resp-ring") {
      resp_ring = value;
    } else {
      return usage(("unknown argument " + std::string(flag)).c_str());
    }
  }
  if (options.replica_id.empty() || req_ring.empty() || resp_ring.empty()) {
    return usage("--replica-id, --req-ring and --resp-ring are required");
  }
  std::string error;
  const auto request_fds = tokenbus::ring::parse_ring_fds(req_ring, &error);
  if (!request_fds) return usage(("--req-ring: " + error).c_str());
  const auto response_fds = tokenbus::ring::parse_ring_fds(resp_ring, &error);
  if (!response_fds) return usage(("--resp-ring: " + error).c_str());
  options.request_ring = *request_fds;
  options.response_ring = *response_fds;

  // Signals are taken from a signalfd by this thread; blocked before any thread starts, so all inherit it.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // A replica outlives no agent: if the agent dies (even by SIGKILL), the kernel sends us SIGTERM, which
  // shuts down cleanly like any other stop. An agent already gone before this line left us with init.
  ::prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (::getppid() == 1) {
    log(LogLevel::kError, "replica", "replica %s: the agent that started it is gone", options.replica_id.c_str());
    return 1;
  }
  const int signal_fd = ::signalfd(-1, &signals, SFD_CLOEXEC);
  if (signal_fd < 0) {
    log(LogLevel::kError, "replica", "signalfd: %s", std::strerror(errno));
    return 1;
  }

  try {
    tokenbus::replica::ReplicaServer server(options);
    if (!server.start(error)) {
      log(LogLevel::kError, "replica", "replica %s: %s", options.replica_id.c_str(), error.c_str());
      return 1;
    }
    const std::string host = options.listen.substr(0, options.listen.rfind(':'));
    std::printf("LISTENING %s:%d\n", host.c_str(), server.port());
    std::fflush(stdout);

    pollfd events[2] = {{signal_fd, POLLIN, 0}, {server.worker_gone_fd(), POLLIN, 0}};
    while (::poll(events, 2, -1) < 0 && errno == EINTR) {
    }
    if (events[1].revents & POLLIN) {
      server.shutdown(std::chrono::seconds(1));  // its streams were failed already
      return 1;
    }
    signalfd_siginfo info{};
    [[maybe_unused]] const ssize_t n = ::read(signal_fd, &info, sizeof(info));
    log(LogLevel::kInfo, "replica", "replica %s: %s received", options.replica_id.c_str(), strsignal(info.ssi_signo));
    server.shutdown(kShutdownGrace);
  } catch (const tokenbus::ring::RingError& e) {
    log(LogLevel::kError, "replica", "replica %s: %s", options.replica_id.c_str(), e.what());
    return 2;
  }
  return 0;
}
