// tokenbus-replica --listen 127.0.0.1:0 --replica-id ID --req-ring M,D,S --resp-ring M,D,S [--orphan-timeout S]
//                  [--metrics-bind IP:PORT]
// Prints "LISTENING host:port" on stdout once serving, then "METRICS host:port" (where /metrics answers: the
// --metrics-bind address, default 127.0.0.1:0, with its bound port); logs go to stderr. Exits 0 after SIGTERM/SIGINT
// (open streams get 10 s to finish) or once orphaned (below), 1 when the model worker is gone, 2 on bad
// arguments or rings.
//
// A replica outlives its agent: an agent that crashes must not cost the streams running here, nor minutes of
// model loading; the restarted agent re-adopts it. A replica whose agent never returns stops itself: once its
// parent is gone and no agent has called Health or Stats for --orphan-timeout seconds.
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "common/abseil.hpp"
#include "common/log.hpp"
#include "replica/replica_server.hpp"

namespace {

using tokenbus::LogLevel;
using tokenbus::log;

constexpr auto kShutdownGrace = std::chrono::seconds(10);
constexpr double kDefaultOrphanTimeoutS = 60.0;  // schemas/README.md section 4
// How often the parent is looked at: an orphan stops within this after its timeout.
constexpr int kOrphanCheckMs = 1000;

int usage(const char* problem) {
  std::fprintf(stderr,
               "tokenbus-replica: %s\n"
               "usage: tokenbus-replica --listen HOST:PORT --replica-id ID --req-ring MEM,DATA,SPACE "
               "--resp-ring MEM,DATA,SPACE [--orphan-timeout SECONDS] [--metrics-bind IP:PORT]\n",
               problem);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  tokenbus::disable_abseil_deadlock_detection();
  tokenbus::replica::ReplicaOptions options;
  std::string req_ring, resp_ring;
  double orphan_timeout_s = kDefaultOrphanTimeoutS;
  for (int i = 1; i < argc; i += 2) {
    const std::string_view flag = argv[i];
    if (i + 1 >= argc) return usage(("missing value for " + std::string(flag)).c_str());
    const char* value = argv[i + 1];
    if (flag == "--listen") {
      options.listen = value;
    } else if (flag == "--metrics-bind") {
      options.metrics_bind = value;
    } else if (flag == "--replica-id") {
      options.replica_id = value;
    } else if (flag == "--req-ring") {
      req_ring = value;
    } else if (flag == "--resp-ring") {
      resp_ring = value;
    } else if (flag == "--orphan-timeout") {
      char* end = nullptr;
      orphan_timeout_s = std::strtod(value, &end);
      if (end == value || *end != '\0' || !(orphan_timeout_s > 0)) return usage("--orphan-timeout must be > 0");
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
  // Whatever the agent made our stdout and stderr (its LISTENING pipe, a log file), a write to a pipe whose
  // reader died with the agent must fail (EPIPE), not kill us.
  ::signal(SIGPIPE, SIG_IGN);
  const pid_t parent = ::getppid();
  const auto orphan_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(orphan_timeout_s * 1000));
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
    const std::string metrics_host = options.metrics_bind.substr(0, options.metrics_bind.rfind(':'));
    std::printf("LISTENING %s:%d\nMETRICS %s:%d\n", host.c_str(), server.port(), metrics_host.c_str(),
                server.metrics_port());
    std::fflush(stdout);

    pollfd events[2] = {{signal_fd, POLLIN, 0}, {server.worker_gone_fd(), POLLIN, 0}};
    std::optional<std::chrono::steady_clock::time_point> orphaned_at;
    while (true) {
      const int ready = ::poll(events, 2, kOrphanCheckMs);
      if (ready < 0 && errno != EINTR) {
        log(LogLevel::kError, "replica", "replica %s: poll: %s", options.replica_id.c_str(), std::strerror(errno));
        server.shutdown(kShutdownGrace);
        return 1;
      }
      if (events[1].revents & POLLIN) {
        server.shutdown(std::chrono::seconds(1));  // its streams were failed already
        return 1;
      }
      if (events[0].revents & POLLIN) {
        signalfd_siginfo info{};
        [[maybe_unused]] const ssize_t n = ::read(signal_fd, &info, sizeof(info));
        log(LogLevel::kInfo, "replica", "replica %s: %s received", options.replica_id.c_str(),
            strsignal(info.ssi_signo));
        break;
      }
      if (!orphaned_at && ::getppid() != parent) {
        orphaned_at = std::chrono::steady_clock::now();
        log(LogLevel::kWarn, "replica",
            "replica %s: its agent (pid %d) is gone; serving on, and stopping if no agent calls for %.1f s",
            options.replica_id.c_str(), static_cast<int>(parent), orphan_timeout_s);
      }
      if (orphaned_at && std::chrono::steady_clock::now() - *orphaned_at >= orphan_timeout &&
          server.since_last_control_call() >= orphan_timeout) {
        log(LogLevel::kWarn, "replica", "replica %s: orphaned, and no agent called for %.1f s: stopping",
            options.replica_id.c_str(), orphan_timeout_s);
        break;
      }
    }
    server.shutdown(kShutdownGrace);
  } catch (const tokenbus::ring::RingError& e) {
    log(LogLevel::kError, "replica", "replica %s: %s", options.replica_id.c_str(), e.what());
    return 2;
  }
  return 0;
}
