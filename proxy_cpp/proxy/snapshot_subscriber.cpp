#include "proxy/snapshot_subscriber.hpp"

#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <vector>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/log.hpp"
#include "common/snapshot.hpp"
#include "proxy/metrics.hpp"
#include "proxy/proxy_report.hpp"
#include "proxy/router.hpp"
#include "proxy/snapshot_tracker.hpp"

namespace tokenbus::proxy {
namespace {

using Clock = std::chrono::steady_clock;
constexpr std::chrono::milliseconds kPollInterval{250};
constexpr std::chrono::milliseconds kFirstBackoff{100};
constexpr std::chrono::milliseconds kMaxBackoff{5000};
// A bus message is a kind frame and a payload: anything with more frames is dropped unread.
constexpr std::size_t kMaxFrames = 2;

// Receives one multipart message without holding more than one frame past the limits: a message over
// kMaxBusPayloadBytes in all, or with too many frames, is read to its end and dropped as a whole (ZeroMQ's
// maxmsgsize bounds only each frame). Returns false when nothing was waiting; `dropped` names why a
// message was dropped (frames is then empty).
bool receive_bounded(zmq::socket_t& socket, std::vector<zmq::message_t>& frames, const char*& dropped) {
  frames.clear();
  dropped = nullptr;
  zmq::message_t part;
  if (!socket.recv(part, zmq::recv_flags::dontwait)) return false;
  std::size_t total = part.size();
  std::size_t count = 1;
  bool more = part.more();
  frames.push_back(std::move(part));
  while (more) {
    zmq::message_t next;
    (void)socket.recv(next);  // the rest of a multipart message is already queued: this does not wait
    more = next.more();
    total += next.size();
    ++count;
    if (dropped == nullptr && (count > kMaxFrames || total > kMaxBusPayloadBytes + 1024)) {
      dropped = count > kMaxFrames ? "too_many_frames" : "too_large";
      frames.clear();
    }
    if (dropped == nullptr) frames.push_back(std::move(next));
  }
  return true;
}

}  // namespace

SnapshotSubscriber::SnapshotSubscriber(Router& router, std::string pub_endpoint, std::string router_endpoint,
                                       std::chrono::milliseconds head_silence, Metrics* metrics,
                                       std::optional<CurveClientKeys> curve, std::optional<ProxyIdentity> identity)
    : router_(router),
      pub_endpoint_(std::move(pub_endpoint)),
      router_endpoint_(std::move(router_endpoint)),
      head_silence_(head_silence),
      metrics_(metrics),
      curve_(std::move(curve)),
      identity_(std::move(identity)) {}

SnapshotSubscriber::~SnapshotSubscriber() { stop(); }

void SnapshotSubscriber::start() { thread_ = std::thread([this] { run(); }); }

void SnapshotSubscriber::stop() {
  stopping_ = true;
  if (thread_.joinable()) thread_.join();
}

void SnapshotSubscriber::run() {
  std::chrono::milliseconds backoff = kFirstBackoff;
  // Outlives each life of the sockets: re-made sockets keep the versions held.
  SnapshotTracker tracker(head_silence_);
  while (!stopping_) {
    // zmq reports failures by throwing; this thread is not on the request path. A failure is logged, and the
    // sockets are made again after a backoff, while the proxy serves from the snapshot it holds.
    try {
      serve(tracker);
      break;
    } catch (const std::exception& e) {
      log(LogLevel::kError, "proxy", "snapshot subscriber failed: %s; serving from the last snapshot, retrying in "
          "%lld ms", e.what(), static_cast<long long>(backoff.count()));
    }
    const Clock::time_point until = Clock::now() + backoff;
    while (!stopping_ && Clock::now() < until) std::this_thread::sleep_for(std::min(kPollInterval, backoff));
    backoff = std::min(backoff * 2, kMaxBackoff);
  }
  log(LogLevel::kInfo, "proxy", "snapshot subscriber stopped");
}

void SnapshotSubscriber::serve(SnapshotTracker& tracker) {
  zmq::context_t context(1);
  zmq::socket_t sub(context, zmq::socket_type::sub);
  zmq::socket_t dealer(context, zmq::socket_type::dealer);
  for (zmq::socket_t* s : {&sub, &dealer}) {
    s->set(zmq::sockopt::linger, 0);
    // A frame larger than any valid bus payload (plus slack) drops the peer; receive_bounded bounds the rest.
    s->set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(kMaxBusPayloadBytes + 1024));
    if (curve_) {  // set before connect: the handshake is made on connect
      s->set(zmq::sockopt::curve_serverkey, curve_->server_public);
      s->set(zmq::sockopt::curve_publickey, curve_->public_key);
      s->set(zmq::sockopt::curve_secretkey, curve_->secret_key);
    }
  }
  // Requests go only to a connected head and do not pile up while it is away; they are re-sent anyway.
  dealer.set(zmq::sockopt::immediate, 1);
  dealer.set(zmq::sockopt::sndhwm, 4);
  sub.set(zmq::sockopt::subscribe, std::string(1, static_cast<char>(kKindSnapshot)));
  sub.connect(pub_endpoint_);
  dealer.connect(router_endpoint_);
  log(LogLevel::kInfo, "proxy", "snapshot subscriber connecting: SUB %s, DEALER %s%s", pub_endpoint_.c_str(),
      router_endpoint_.c_str(), curve_ ? ", CURVE" : "");

  auto request = [&](const char* why) {
    const std::string payload = encode_snapshot_request(tracker.version());
    const char kind = static_cast<char>(kKindSnapshotRequest);
    std::array<zmq::const_buffer, 2> frames = {zmq::buffer(&kind, 1), zmq::buffer(payload)};
    // Not sent while no head is connected (immediate); then it is retried at the next poll.
    if (zmq::send_multipart(dealer, frames, zmq::send_flags::dontwait)) {
      tracker.requested(Clock::now());
      log(LogLevel::kInfo, "proxy", "snapshot requested (%s), holding version %llu", why,
          static_cast<unsigned long long>(tracker.version()));
    }
  };

  auto on_message = [&](std::vector<zmq::message_t>& frames, const char* source) {
    if (frames.size() != 2 || frames[0].size() != 1) {
      log(LogLevel::kWarn, "proxy", "bad bus message from the head's %s (%s): %zu frames", source,
          source[0] == 'S' ? pub_endpoint_.c_str() : router_endpoint_.c_str(), frames.size());
      if (metrics_) metrics_->count_bus_dropped("bad_frames");
      return;
    }
    const auto kind = *static_cast<const std::uint8_t*>(frames[0].data());
    if (kind != kKindSnapshot) {
      log(LogLevel::kWarn, "proxy", "unexpected bus message kind 0x%02x on %s", kind, source);
      if (metrics_) metrics_->count_bus_dropped("bad_kind");
      return;
    }
    std::string error;
    std::optional<Snapshot> snapshot = decode_snapshot(frames[1].to_string_view(), error);
    if (!snapshot) {
      log(LogLevel::kWarn, "proxy", "bad snapshot on %s ignored: %s", source, error.c_str());
      if (metrics_) metrics_->count_bus_dropped("bad_snapshot");
      return;
    }
    router_.mark_received();
    const SnapshotTracker::Decision d = tracker.on_snapshot(*snapshot, Clock::now());
    if (d.note != nullptr) {
      log(LogLevel::kInfo, "proxy", "snapshot version %llu of head %s (epoch %llu): %s",
          static_cast<unsigned long long>(snapshot->version), snapshot->head_id.c_str(),
          static_cast<unsigned long long>(snapshot->epoch), d.note);
    }
    if (d.apply) router_.apply(std::make_shared<const Snapshot>(std::move(*snapshot)));
    if (d.request != nullptr) request(d.request);
  };

  // At start (once a head is connected: sends to none are dropped), then every interval.
  Clock::time_point next_report = Clock::now();
  auto report = [&] {
    if (!identity_ || Clock::now() < next_report) return;
    const std::shared_ptr<const Snapshot> held = router_.snapshot();
    const std::string payload = encode_proxy_report({identity_->proxy_id, identity_->addr, held ? held->version : 0,
                                                     metrics_ ? metrics_->open_streams() : 0});
    const char kind = static_cast<char>(kKindProxyReport);
    std::array<zmq::const_buffer, 2> frames = {zmq::buffer(&kind, 1), zmq::buffer(payload)};
    if (zmq::send_multipart(dealer, frames, zmq::send_flags::dontwait)) {
      next_report = Clock::now() + kProxyReportInterval;
    }
  };

  request("start");
  report();
  std::array<zmq::pollitem_t, 2> items = {zmq::pollitem_t{sub.handle(), 0, ZMQ_POLLIN, 0},
                                          zmq::pollitem_t{dealer.handle(), 0, ZMQ_POLLIN, 0}};
  std::vector<zmq::message_t> frames;
  while (!stopping_) {
    zmq::poll(items.data(), items.size(), kPollInterval);
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (!(items[i].revents & ZMQ_POLLIN)) continue;
      zmq::socket_t& socket = i == 0 ? sub : dealer;
      const char* source = i == 0 ? "SUB" : "DEALER";
      // Drain what is queued; at most a bounded batch per wake-up so that stop stays responsive.
      for (int n = 0; n < 64; ++n) {
        const char* dropped = nullptr;
        if (!receive_bounded(socket, frames, dropped)) break;
        if (dropped != nullptr) {
          log(LogLevel::kWarn, "proxy", "bus message from the head's %s (%s) dropped: %s", source,
              i == 0 ? pub_endpoint_.c_str() : router_endpoint_.c_str(), dropped);
          if (metrics_) metrics_->count_bus_dropped(dropped);
          continue;
        }
        on_message(frames, source);
      }
    }
    if (const char* why = tracker.due_request(Clock::now())) request(why);
    report();
  }
}

}  // namespace tokenbus::proxy
