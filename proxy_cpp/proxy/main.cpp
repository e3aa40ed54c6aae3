// tokenbus-proxy: the HTTP data plane. Command line (schemas/README.md section 4):
//   tokenbus-proxy --bind 127.0.0.1:8000 --head-router tcp://127.0.0.1:5555 --head-pub tcp://127.0.0.1:5556
//                  [--threads N] [--max-connections N] [--queue-depth N] [--queue-timeout S]
//                  [--drain-grace S] [--head-silence S] [--api-keys FILE [--metrics-auth]]
//                  [--keys DIR [--key-name NAME]] [--proxy-id ID]
// Prints "LISTENING host:port" on stdout once bound; logs go to stderr. SIGTERM drains (open streams get
// the drain grace to finish), SIGINT stops at once, SIGHUP reloads the API key file.
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "common/abseil.hpp"
#include "common/log.hpp"
#include "proxy/api_keys.hpp"
#include "proxy/curve_keys.hpp"
#include "proxy/http_server.hpp"
#include "proxy/metrics.hpp"
#include "proxy/router.hpp"
#include "proxy/snapshot_subscriber.hpp"

namespace {

constexpr auto kShutdownGrace = std::chrono::seconds(5);

struct Options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 8000;
  std::string head_router = "tcp://127.0.0.1:5555";
  std::string head_pub = "tcp://127.0.0.1:5556";
  int threads = 2;
  tokenbus::proxy::ProxyLimits limits;
  // The head's liveness period (3 heartbeats of 1 s, bus/endpoints.py): silent this long, it is gone.
  std::chrono::milliseconds head_silence{3000};
  std::string api_keys;  // the key file; empty: no key needed
  bool metrics_auth = false;
  std::string keys_dir;  // CURVE certificates; empty: plain ZeroMQ
  std::string key_name = "proxy";
  std::string proxy_id;  // empty: <hostname>:<port>
};

std::string hostname() {
  char name[256] = {};
  return gethostname(name, sizeof(name) - 1) == 0 ? name : "localhost";
}

[[noreturn]] void usage(const char* problem) {
  std::fprintf(stderr,
               "tokenbus-proxy: %s\nusage: tokenbus-proxy [--bind HOST:PORT] [--head-router ENDPOINT] "
               "[--head-pub ENDPOINT] [--threads N] [--max-connections N] [--queue-depth N] [--queue-timeout S] "
               "[--drain-grace S] [--head-silence S] [--api-keys FILE [--metrics-auth]] "
               "[--keys DIR [--key-name NAME]] [--proxy-id ID]\n",
               problem);
  std::exit(2);
}

bool parse_int(const std::string& s, long lo, long hi, long& out) {
  char* end = nullptr;
  errno = 0;
  out = std::strtol(s.c_str(), &end, 10);
  return !s.empty() && errno == 0 && *end == '\0' && out >= lo && out <= hi;
}

// Seconds (a decimal number from 0 to a day) as milliseconds.
bool parse_seconds(const std::string& s, std::chrono::milliseconds& out) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || errno != 0 || *end != '\0' || !(v >= 0 && v <= 86400)) return false;
  out = std::chrono::milliseconds(static_cast<long long>(v * 1000));
  return true;
}

Options parse_args(int argc, char** argv) {
  Options o;
  if (const char* keys = std::getenv("TOKENBUS_KEYS")) o.keys_dir = keys;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--metrics-auth") {  // the one flag without a value
      o.metrics_auth = true;
      continue;
    }
    if (i + 1 >= argc) usage(("missing value for " + flag).c_str());
    const std::string value = argv[++i];
    long n = 0;
    if (flag == "--bind") {
      const std::size_t colon = value.rfind(':');
      if (colon == std::string::npos || !parse_int(value.substr(colon + 1), 0, 65535, n)) {
        usage("--bind wants HOST:PORT");
      }
      o.host = value.substr(0, colon);
      o.port = static_cast<std::uint16_t>(n);
    } else if (flag == "--head-router") {
      o.head_router = value;
    } else if (flag == "--head-pub") {
      o.head_pub = value;
    } else if (flag == "--threads") {
      if (!parse_int(value, 1, 256, n)) usage("--threads wants a number from 1 to 256");
      o.threads = static_cast<int>(n);
    } else if (flag == "--max-connections") {
      if (!parse_int(value, 1, 1 << 20, n)) usage("--max-connections wants a number from 1 to 1048576");
      o.limits.max_connections = static_cast<std::size_t>(n);
    } else if (flag == "--queue-depth") {
      if (!parse_int(value, 0, 1 << 20, n)) usage("--queue-depth wants a number from 0 to 1048576");
      o.limits.queue_depth = static_cast<std::size_t>(n);
    } else if (flag == "--queue-timeout") {
      if (!parse_seconds(value, o.limits.queue_timeout)) usage("--queue-timeout wants seconds");
    } else if (flag == "--drain-grace") {
      if (!parse_seconds(value, o.limits.drain_grace)) usage("--drain-grace wants seconds");
    } else if (flag == "--head-silence") {
      if (!parse_seconds(value, o.head_silence)) usage("--head-silence wants seconds");
    } else if (flag == "--api-keys") {
      o.api_keys = value;
    } else if (flag == "--keys") {
      o.keys_dir = value;
    } else if (flag == "--key-name") {
      o.key_name = value;
    } else if (flag == "--proxy-id") {
      if (value.empty()) usage("--proxy-id wants a name");
      o.proxy_id = value;
    } else {
      usage(("unknown option " + flag).c_str());
    }
  }
  if (o.metrics_auth && o.api_keys.empty()) usage("--metrics-auth needs --api-keys");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace tokenbus;
  const Options options = parse_args(argc, argv);
  disable_abseil_deadlock_detection();

  // Signals are taken synchronously by this thread (sigwait), so every thread started below inherits a
  // mask that blocks them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  // Bad key files stop the start, naming the file (and line): a proxy must not serve open, or blind, by mistake.
  std::string error;
  proxy::ApiKeys api_keys;
  if (!options.api_keys.empty() && !api_keys.load(options.api_keys, error)) {
    log(LogLevel::kError, "proxy", "bad --api-keys file: %s", error.c_str());
    return 2;
  }
  std::optional<proxy::CurveClientKeys> curve;
  if (!options.keys_dir.empty() &&
      !proxy::load_curve_client_keys(options.keys_dir, options.key_name, curve.emplace(), error)) {
    log(LogLevel::kError, "proxy", "bad --keys: %s", error.c_str());
    return 2;
  }
  log(LogLevel::kInfo, "proxy",
      "starting: bind %s:%u, head router %s, head pub %s, %d I/O threads, API keys: %s%s, bus: %s",
      options.host.c_str(), options.port, options.head_router.c_str(), options.head_pub.c_str(), options.threads,
      options.api_keys.empty() ? "none (open)" : (std::to_string(api_keys.size()) + " from " + options.api_keys).c_str(),
      options.metrics_auth ? " (also on /metrics)" : "",
      curve ? ("CURVE as " + options.key_name + " from " + options.keys_dir).c_str() : "plain");
  proxy::Router router(options.limits.outlier, options.limits.queue_depth);
  proxy::Metrics metrics;
  const proxy::AccessPolicy access{options.api_keys.empty() ? nullptr : &api_keys, options.metrics_auth};
  proxy::HttpServer server(router, metrics, options.threads, options.limits, access);
  const std::uint16_t port = server.listen(options.host, options.port, error);
  if (port == 0) {
    log(LogLevel::kError, "proxy", "%s", error.c_str());
    return 1;
  }
  // Where clients reach it: a wildcard bind is reached at the machine's name.
  const bool wildcard = options.host == "0.0.0.0" || options.host == "::";
  const std::string addr = (wildcard ? hostname() : options.host) + ":" + std::to_string(port);
  const std::string proxy_id = options.proxy_id.empty() ? hostname() + ":" + std::to_string(port) : options.proxy_id;
  log(LogLevel::kInfo, "proxy", "reporting to the head as %s at %s", proxy_id.c_str(), addr.c_str());
  proxy::SnapshotSubscriber subscriber(router, options.head_pub, options.head_router, options.head_silence, &metrics,
                                       curve, proxy::ProxyIdentity{proxy_id, addr});
  subscriber.start();
  server.start();
  std::printf("LISTENING %s:%u\n", options.host.c_str(), port);
  std::fflush(stdout);

  int signal = 0;
  // SIGHUP is handled here, off the I/O threads: the file is small and bounded, and the swap is atomic.
  while (sigwait(&signals, &signal) == 0 && signal == SIGHUP) {
    if (options.api_keys.empty()) {
      log(LogLevel::kInfo, "proxy", "SIGHUP received: no --api-keys file to reload");
    } else if (api_keys.load(options.api_keys, error)) {
      log(LogLevel::kInfo, "proxy", "SIGHUP received: %zu API keys reloaded from %s", api_keys.size(),
          options.api_keys.c_str());
    } else {
      log(LogLevel::kWarn, "proxy", "SIGHUP received: API keys not reloaded, keeping the %zu held: %s",
          api_keys.size(), error.c_str());
    }
  }
  log(LogLevel::kInfo, "proxy", "%s received: stopping", signal == SIGINT ? "SIGINT" : "SIGTERM");
  const bool drained = signal == SIGTERM ? server.drain(options.limits.drain_grace) : server.stop(kShutdownGrace);
  subscriber.stop();
  log(LogLevel::kInfo, "proxy", "stopped");
  if (!drained) {
    // Abandoned connections still have gRPC calls whose callbacks would reach destroyed I/O contexts.
    std::fflush(stderr);
    std::_Exit(0);
  }
  return 0;
}
