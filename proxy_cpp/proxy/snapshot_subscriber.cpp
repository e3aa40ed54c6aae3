#include "proxy/snapshot_subscriber.hpp"

#include <array>
#include <chrono>
#include <iterator>
#include <optional>
#include <memory>
#include <vector>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/log.hpp"
#include "common/snapshot.hpp"
#include "proxy/router.hpp"

namespace tokenbus::proxy {
namespace {

using Clock = std::chrono::steady_clock;
constexpr std::chrono::milliseconds kPollInterval{250};
constexpr std::chrono::seconds kRequestRetry{1};     // until the first snapshot, if a request went unanswered
constexpr std::chrono::seconds kSilenceRetry{5};     // when nothing has come for this long

// What the thread knows of the snapshots it has seen; owned by the subscriber thread alone.
struct Held {
  std::uint64_t version = 0;  // 0: none yet
  Clock::time_point last_received{};
  Clock::time_point last_request{};
};

}  // namespace

SnapshotSubscriber::SnapshotSubscriber(Router& router, std::string pub_endpoint, std::string router_endpoint)
    : router_(router), pub_endpoint_(std::move(pub_endpoint)), router_endpoint_(std::move(router_endpoint)) {}

SnapshotSubscriber::~SnapshotSubscriber() { stop(); }

void SnapshotSubscriber::start() { thread_ = std::thread([this] { run(); }); }

void SnapshotSubscriber::stop() {
  stopping_ = true;
  if (thread_.joinable()) thread_.join();
}

void SnapshotSubscriber::run() {
  // zmq reports failures by throwing; this thread is not on the request path, and a failure here (a bad
  // endpoint at start) is logged and leaves the proxy serving from what it holds.
  try {
    zmq::context_t context(1);
    zmq::socket_t sub(context, zmq::socket_type::sub);
    zmq::socket_t dealer(context, zmq::socket_type::dealer);
    for (zmq::socket_t* s : {&sub, &dealer}) {
      s->set(zmq::sockopt::linger, 0);
      // Bounded reads: a frame larger than any valid bus payload (plus slack) drops the peer instead.
      s->set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(kMaxBusPayloadBytes + 1024));
    }
    // Requests go only to a connected head and do not pile up while it is away; they are re-sent anyway.
    dealer.set(zmq::sockopt::immediate, 1);
    dealer.set(zmq::sockopt::sndhwm, 4);
    sub.set(zmq::sockopt::subscribe, std::string(1, static_cast<char>(kKindSnapshot)));
    sub.connect(pub_endpoint_);
    dealer.connect(router_endpoint_);
    log(LogLevel::kInfo, "proxy", "snapshot subscriber connecting: SUB %s, DEALER %s", pub_endpoint_.c_str(),
        router_endpoint_.c_str());

    Held held;
    auto request = [&](const char* why) {
      const std::string payload = encode_snapshot_request(held.version);
      const char kind = static_cast<char>(kKindSnapshotRequest);
      std::array<zmq::const_buffer, 2> frames = {zmq::buffer(&kind, 1), zmq::buffer(payload)};
      // Not sent while no head is connected (immediate); then it is retried at the next poll.
      if (zmq::send_multipart(dealer, frames, zmq::send_flags::dontwait)) {
        held.last_request = Clock::now();
        log(LogLevel::kInfo, "proxy", "snapshot requested (%s), holding version %llu", why,
            static_cast<unsigned long long>(held.version));
      }
    };

    auto on_message = [&](std::vector<zmq::message_t>& frames, const char* source) {
      if (frames.size() != 2 || frames[0].size() != 1) {
        log(LogLevel::kWarn, "proxy", "bad bus message on %s: %zu frames", source, frames.size());
        return;
      }
      const auto kind = *static_cast<const std::uint8_t*>(frames[0].data());
      if (kind != kKindSnapshot) {
        log(LogLevel::kWarn, "proxy", "unexpected bus message kind 0x%02x on %s", kind, source);
        return;
      }
      std::string error;
      std::optional<Snapshot> snapshot = decode_snapshot(frames[1].to_string_view(), error);
      if (!snapshot) {
        log(LogLevel::kWarn, "proxy", "bad snapshot on %s ignored: %s", source, error.c_str());
        return;
      }
      held.last_received = Clock::now();
      router_.mark_received();
      const std::uint64_t version = snapshot->version;
      if (version <= held.version) return;  // a re-publication or an old answer
      const bool gap = held.version != 0 && version_epoch(version) == version_epoch(held.version) &&
                       version != held.version + 1;
      held.version = version;
      // Every snapshot is complete, so a newer one is applied at once; a gap still asks the head for its
      // latest, as the contract says, in case what arrived was itself delayed.
      router_.apply(std::make_shared<const Snapshot>(std::move(*snapshot)));
      if (gap) request("version gap");
    };

    request("start");
    std::array<zmq::pollitem_t, 2> items = {zmq::pollitem_t{sub.handle(), 0, ZMQ_POLLIN, 0},
                                            zmq::pollitem_t{dealer.handle(), 0, ZMQ_POLLIN, 0}};
    std::vector<zmq::message_t> frames;
    while (!stopping_) {
      zmq::poll(items.data(), items.size(), kPollInterval);
      for (std::size_t i = 0; i < items.size(); ++i) {
        if (!(items[i].revents & ZMQ_POLLIN)) continue;
        zmq::socket_t& socket = i == 0 ? sub : dealer;
        // Drain what is queued; at most a bounded batch per wake-up so that stop stays responsive.
        for (int n = 0; n < 64; ++n) {
          frames.clear();
          if (!zmq::recv_multipart(socket, std::back_inserter(frames), zmq::recv_flags::dontwait)) break;
          on_message(frames, i == 0 ? "SUB" : "DEALER");
        }
      }
      const Clock::time_point now = Clock::now();
      if (held.version == 0 && now - held.last_request >= kRequestRetry) {
        request("no snapshot yet");
      } else if (held.version != 0 && now - held.last_received >= kSilenceRetry &&
                 now - held.last_request >= kSilenceRetry) {
        request("head silent");
      }
    }
    log(LogLevel::kInfo, "proxy", "snapshot subscriber stopped");
  } catch (const zmq::error_t& e) {
    log(LogLevel::kError, "proxy", "snapshot subscriber failed: %s; serving from the last snapshot", e.what());
  }
}

}  // namespace tokenbus::proxy
