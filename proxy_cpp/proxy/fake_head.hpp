#pragma once
// The head's side of the snapshot protocol for the proxy's tests: a real ROUTER and PUB on ephemeral
// loopback ports, CURVE servers when given a secret key (with no ZAP handler: any client key is accepted).
#include <chrono>
#include <optional>
#include <string>
#include <vector>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/snapshot.hpp"

namespace tokenbus::proxy::testing {

class FakeHead {
 public:
  // `curve_secret_key`: the head's secret key in Z85; empty for plain ZeroMQ.
  explicit FakeHead(const std::string& curve_secret_key = {})
      : router_(context_, zmq::socket_type::router), pub_(context_, zmq::socket_type::pub) {
    for (zmq::socket_t* s : {&router_, &pub_}) {
      s->set(zmq::sockopt::linger, 0);
      if (!curve_secret_key.empty()) {
        s->set(zmq::sockopt::curve_server, 1);
        s->set(zmq::sockopt::curve_secretkey, curve_secret_key);
      }
    }
    router_.bind("tcp://127.0.0.1:*");
    pub_.bind("tcp://127.0.0.1:*");
  }

  std::string router_endpoint() { return router_.get(zmq::sockopt::last_endpoint); }
  std::string pub_endpoint() { return pub_.get(zmq::sockopt::last_endpoint); }

  struct Request {
    std::string identity;
    std::uint8_t kind;
    std::string payload;
  };

  // The next message on the ROUTER, if one arrives in time.
  std::optional<Request> receive(std::chrono::milliseconds timeout) {
    zmq::pollitem_t item{router_.handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, timeout) <= 0) return std::nullopt;
    std::vector<zmq::message_t> frames;
    if (!zmq::recv_multipart(router_, std::back_inserter(frames)) || frames.size() != 3 || frames[1].size() != 1) {
      return std::nullopt;
    }
    return Request{frames[0].to_string(), *frames[1].data<std::uint8_t>(), frames[2].to_string()};
  }

  void reply(const std::string& identity, const std::string& payload) {
    const char kind = static_cast<char>(kKindSnapshot);
    std::array<zmq::const_buffer, 3> frames = {zmq::buffer(identity), zmq::buffer(&kind, 1), zmq::buffer(payload)};
    zmq::send_multipart(router_, frames);
  }

  void publish(const std::string& payload, std::uint8_t kind = kKindSnapshot) {
    const char k = static_cast<char>(kind);
    std::array<zmq::const_buffer, 2> frames = {zmq::buffer(&k, 1), zmq::buffer(payload)};
    zmq::send_multipart(pub_, frames);
  }

 private:
  zmq::context_t context_{1};
  zmq::socket_t router_;
  zmq::socket_t pub_;
};

}  // namespace tokenbus::proxy::testing
