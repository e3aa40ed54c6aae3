// libFuzzer target: the proxy's HTTP front end as a client reaches it. Each input is the bytes a client sends
// on one connection (one request, several pipelined, or garbage) to the real HttpServer in this process:
// Beast's request parser with the proxy's limits, the 100-continue and refusal paths of http_server.cpp, and
// the request handlers (path and query parsing, the OpenAI and plain-text bodies) up to routing, which finds
// deployment "demo" with no replica. The client then half-closes and reads until the server closes; a
// server that never closes is a hang, reported as a crash.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "common/snapshot.hpp"
#include "proxy/http_server.hpp"
#include "proxy/metrics.hpp"
#include "proxy/router.hpp"

namespace {

// Longer than the server's own I/O timeout (30 s), shorter than the -timeout the Makefile gives libFuzzer
// (60 s): only a connection the server never closes gets here, and it is reported as such.
constexpr int kHangMs = 45'000;

struct Front {
  Front() : server(router, metrics, 1) {
    auto snapshot = std::make_shared<tokenbus::Snapshot>();
    snapshot->epoch = 1;
    snapshot->version = (1ull << 32) | 1;
    tokenbus::Deployment demo;
    demo.name = "demo";
    snapshot->deployments.push_back(std::move(demo));
    router.apply(std::move(snapshot));
    router.mark_received();
    std::string error;
    port = server.listen("127.0.0.1", 0, error);
    if (port == 0) {
      std::fprintf(stderr, "http_front_fuzz: %s\n", error.c_str());
      std::abort();
    }
    server.start();
  }
  tokenbus::proxy::Router router;
  tokenbus::proxy::Metrics metrics;
  tokenbus::proxy::HttpServer server;
  std::uint16_t port = 0;
};

// Sends `data`, half-closes, and reads until the server closes. False if it did not close in time.
bool exchange(std::uint16_t port, const std::uint8_t* data, std::size_t size) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) std::abort();
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) std::abort();
  bool closed = false;
  std::size_t sent = 0;
  bool half_closed = false;
  char sink[16 * 1024];
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kHangMs);
  while (!closed && std::chrono::steady_clock::now() < deadline) {
    // Write and read together: a server answering early (413, 400) may stop reading before it has it all.
    pollfd p{fd, static_cast<short>(POLLIN | (half_closed ? 0 : POLLOUT)), 0};
    if (::poll(&p, 1, 100) < 0) break;
    if (p.revents & POLLOUT) {
      const ssize_t n = ::send(fd, data + sent, size - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) sent += static_cast<std::size_t>(n);
      if (n < 0 && errno != EAGAIN) half_closed = true;  // the server closed its side: it answered
      if (sent == size && !half_closed) {
        ::shutdown(fd, SHUT_WR);
        half_closed = true;
      }
    }
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      const ssize_t n = ::recv(fd, sink, sizeof(sink), MSG_DONTWAIT);
      closed = n == 0 || (n < 0 && errno != EAGAIN);
    }
  }
  ::close(fd);
  return closed;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Front* front = new Front;  // lives for the whole run; its threads serve every input
  if (size == 0) return 0;
  if (!exchange(front->port, data, size)) {
    std::fprintf(stderr, "http_front_fuzz: the server did not close the connection within %d ms\n", kHangMs);
    std::abort();
  }
  return 0;
}
