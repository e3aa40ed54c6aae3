#pragma once
// One client connection as the HTTP server and the request handlers share it. Beast-heavy: include only
// from the server and handler translation units.
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <boost/asio/awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <chrono>
#include <cstddef>
#include <string>

namespace tokenbus::proxy {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

using Request = http::request<http::string_body>;

// Every read and write on a client connection finishes within this, or the connection is dropped.
inline constexpr std::chrono::seconds kIoTimeout{30};

// Owned by its coroutine in http_server.cpp; handlers read the request from it and write responses to it.
struct Connection {
  beast::tcp_stream stream;
  beast::flat_buffer buffer;  // bytes read but not yet parsed (the next keep-alive or pipelined request)
  std::string out;            // reused output buffer of streamed responses: no allocation per token
  std::string peer;           // "ip:port", for log lines
  bool busy = false;          // a request is being answered (a drain lets it finish)
};

}  // namespace tokenbus::proxy
