#pragma once
// A blocking HTTP/1.1 test client on one keep-alive connection, and an SSE splitter, for the proxy's
// in-process tests.
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <string>
#include <vector>

namespace tokenbus::proxy::testing {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

struct Reply {
  int status = 0;
  std::string body;
  http::fields headers;
  std::string error;  // the read failed (e.g. a body cut before its last chunk): what was read is above
};

class Client {
 public:
  explicit Client(std::uint16_t port) : stream_(io_) { stream_.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port)); }

  Reply send(http::verb verb, const std::string& target, const std::string& body = "",
             const std::string& content_type = "application/json") {
    http::request<http::string_body> req(verb, target, 11);
    req.set(http::field::host, "127.0.0.1");
    if (!authorization_.empty()) req.set(http::field::authorization, authorization_);
    for (const auto& [name, value] : headers_) req.set(name, value);
    if (!body.empty() || verb == http::verb::post) {
      req.set(http::field::content_type, content_type);
      req.body() = body;
      req.prepare_payload();
    }
    stream_.expires_after(std::chrono::seconds(20));
    http::write(stream_, req);
    http::response_parser<http::string_body> parser;
    parser.body_limit(64 * 1024 * 1024);
    boost::system::error_code ec;
    http::read(stream_, buffer_, parser, ec);
    if (ec && !parser.is_header_done()) return Reply{0, "", {}, ec.message()};
    http::response<http::string_body> res = parser.release();
    return Reply{static_cast<int>(res.result_int()), res.body(), static_cast<http::fields&>(res),
                 ec ? ec.message() : ""};
  }

  Reply post(const std::string& target, const std::string& body) { return send(http::verb::post, target, body); }
  // The Authorization header of the requests from now on (empty: none).
  void set_authorization(std::string value) { authorization_ = std::move(value); }
  // Another header of the requests from now on.
  void set_header(std::string name, std::string value) { headers_.emplace_back(std::move(name), std::move(value)); }
  Reply get(const std::string& target) { return send(http::verb::get, target); }

 private:
  net::io_context io_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::string authorization_;
  std::vector<std::pair<std::string, std::string>> headers_;
};

// Splits an SSE body into its data payloads.
inline std::vector<std::string> sse_data(const std::string& body) {
  std::vector<std::string> out;
  std::size_t at = 0;
  while (at < body.size()) {
    const std::size_t end = body.find("\n\n", at);
    if (end == std::string::npos) break;
    EXPECT_EQ(body.compare(at, 6, "data: "), 0) << body.substr(at, 40);
    out.push_back(body.substr(at + 6, end - at - 6));
    at = end + 2;
  }
  return out;
}

}  // namespace tokenbus::proxy::testing
