// The tokenbus-proxy process itself: its command line, the LISTENING line, a snapshot from a (fake) head
// making it ready, a clean exit on SIGTERM, and exit 2 naming the file on a bad key file.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <regex>
#include <thread>

#include "proxy/fake_head.hpp"

extern char** environ;

namespace tokenbus::proxy {
namespace {

using namespace std::chrono_literals;

// Reads one line from `fd` within `timeout`.
std::optional<std::string> read_line(int fd, std::chrono::milliseconds timeout) {
  std::string line;
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    pollfd p{fd, POLLIN, 0};
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
    if (poll(&p, 1, static_cast<int>(std::max<long>(left.count(), 0))) <= 0) break;
    char c = 0;
    if (read(fd, &c, 1) != 1) break;
    if (c == '\n') return line;
    line += c;
  }
  return std::nullopt;
}

// The status code of `GET path` on 127.0.0.1:port, or 0 if the request failed.
int http_get_status(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int status = 0;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request = "GET " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    if (write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
      if (const auto line = read_line(fd, 5s)) std::sscanf(line->c_str(), "HTTP/1.1 %d", &status);
    }
  }
  close(fd);
  return status;
}

std::string golden_snapshot() {
  std::ifstream in(std::string(TOKENBUS_GOLDEN_DIR) + "/snapshot.msgpack", std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(ProxyProcess, ListensServesAndStopsOnSigterm) {
  testing::FakeHead head;
  int out[2];
  ASSERT_EQ(pipe(out), 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, out[0]);
  const std::string router = head.router_endpoint();
  const std::string pub = head.pub_endpoint();
  std::vector<std::string> args = {TOKENBUS_PROXY_BIN, "--bind", "127.0.0.1:0", "--head-router", router,
                                   "--head-pub",       pub,        "--threads",   "2"};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  ASSERT_EQ(posix_spawn(&pid, TOKENBUS_PROXY_BIN, &actions, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&actions);
  close(out[1]);

  const std::optional<std::string> line = read_line(out[0], 10s);
  ASSERT_TRUE(line) << "no LISTENING line";
  std::smatch match;
  ASSERT_TRUE(std::regex_match(*line, match, std::regex(R"(LISTENING 127\.0\.0\.1:(\d+))"))) << *line;
  const int port = std::stoi(match[1]);
  ASSERT_GT(port, 0);
  EXPECT_EQ(http_get_status(port, "/healthz"), 200);
  EXPECT_EQ(http_get_status(port, "/readyz"), 503);

  // the proxy asks the head for a snapshot; once answered it is ready
  const std::optional<testing::FakeHead::Request> request = head.receive(10s);
  ASSERT_TRUE(request);
  EXPECT_EQ(request->kind, kKindSnapshotRequest);
  head.reply(request->identity, golden_snapshot());
  int ready = 0;
  for (auto end = std::chrono::steady_clock::now() + 10s; std::chrono::steady_clock::now() < end;) {
    if ((ready = http_get_status(port, "/readyz")) == 200) break;
    std::this_thread::sleep_for(20ms);  // poll interval; the condition is re-checked each round
  }
  EXPECT_EQ(ready, 200);

  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = -1;
  for (auto end = std::chrono::steady_clock::now() + 10s; std::chrono::steady_clock::now() < end;) {
    if (waitpid(pid, &status, WNOHANG) == pid) break;
    std::this_thread::sleep_for(20ms);
  }
  if (!WIFEXITED(status)) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    FAIL() << "tokenbus-proxy did not exit on SIGTERM";
  }
  EXPECT_EQ(WEXITSTATUS(status), 0);
  close(out[0]);
}

// Runs tokenbus-proxy with `args` until it exits by itself (within 10 s); its exit status and stderr.
std::pair<int, std::string> run_to_exit(std::vector<std::string> args) {
  int err[2];
  EXPECT_EQ(pipe(err), 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, err[1], STDERR_FILENO);
  posix_spawn_file_actions_addclose(&actions, err[0]);
  args.insert(args.begin(), TOKENBUS_PROXY_BIN);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  EXPECT_EQ(posix_spawn(&pid, TOKENBUS_PROXY_BIN, &actions, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&actions);
  close(err[1]);
  std::string text;
  while (const auto line = read_line(err[0], 10s)) text += *line + "\n";  // ends at EOF: the process is gone
  close(err[0]);
  int status = -1;
  for (auto end = std::chrono::steady_clock::now() + 10s; std::chrono::steady_clock::now() < end;) {
    if (waitpid(pid, &status, WNOHANG) == pid) return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, text};
    std::this_thread::sleep_for(20ms);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return {-1, text + "(did not exit)"};
}

TEST(ProxyProcess, BadKeyFilesStopTheStartNamingTheFile) {
  char dir[] = "/tmp/tokenbus-proxy-main-XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string keys = std::string(dir) + "/api-keys";
  std::ofstream(keys) << "# keys\nsk-0123456789abcdef alice\nsk-short bob\n";
  auto [code, err] = run_to_exit({"--bind", "127.0.0.1:0", "--api-keys", keys});
  EXPECT_EQ(code, 2) << err;
  EXPECT_NE(err.find(keys + ": line 3: the key is 8 bytes long"), std::string::npos) << err;
  EXPECT_EQ(err.find("sk-short"), std::string::npos) << "a key was logged: " << err;

  std::tie(code, err) = run_to_exit({"--bind", "127.0.0.1:0", "--keys", dir});
  EXPECT_EQ(code, 2) << err;
  EXPECT_NE(err.find(std::string(dir) + "/head.key: No such file or directory"), std::string::npos) << err;

  std::tie(code, err) = run_to_exit({"--bind", "127.0.0.1:0", "--metrics-auth"});
  EXPECT_EQ(code, 2) << err;
  EXPECT_NE(err.find("--metrics-auth needs --api-keys"), std::string::npos) << err;
  std::remove(keys.c_str());
  rmdir(dir);
}

}  // namespace
}  // namespace tokenbus::proxy
