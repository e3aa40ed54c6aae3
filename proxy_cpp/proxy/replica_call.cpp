#include "proxy/replica_call.hpp"

#include <grpcpp/grpcpp.h>

#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <mutex>

#include "common/log.hpp"
#include "proxy/router.hpp"
#include "tokenbus.grpc.pb.h"

namespace tokenbus::proxy {

namespace net = boost::asio;

struct ReplicaChannel {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Replica::Stub> stub;
};

ReplicaChannel& ReplicaHandle::channel() {
  std::call_once(channel_once_, [this] {
    grpc::ChannelArguments args;
    // Each replica gets its own HTTP/2 connection rather than one shared through gRPC's global pool.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    auto channel = grpc::CreateCustomChannel(address_, grpc::InsecureChannelCredentials(), args);
    channel_ = std::make_shared<ReplicaChannel>(ReplicaChannel{channel, v1::Replica::NewStub(channel)});
    log(LogLevel::kInfo, "proxy", "replica channel to %s created", address_.c_str());
  });
  return *channel_;
}

ReplicaHandle::~ReplicaHandle() {
  if (channel_) log(LogLevel::kInfo, "proxy", "replica channel to %s closed", address_.c_str());
}

// State shared by the reactor (gRPC threads) and the coroutine (its executor's thread).
struct ReplicaCall::Shared {
  explicit Shared(net::any_io_executor executor) : timer(executor, net::steady_timer::time_point::max()) {}

  std::mutex mutex;
  bool chunk_ready = false;  // a read completed with a message
  bool reads_done = false;   // a read completed without one: the stream is over
  bool done = false;         // OnDone ran; `status` is set
  bool parked = false;       // the coroutine is (about to be) waiting on `timer`
  CallStatus status;
  net::steady_timer timer;  // used only on the executor's thread
};

class ReplicaCall::Reactor final : public grpc::ClientReadReactor<v1::GenerateChunk> {
 public:
  Reactor(std::shared_ptr<Shared> shared, const v1::GenerateRequest& request, std::chrono::milliseconds max_duration)
      : shared_(std::move(shared)), request_(request) {
    context_.set_deadline(std::chrono::system_clock::now() + max_duration);
  }

  void start(v1::Replica::Stub& stub) {
    stub.async()->Generate(&context_, &request_, this);
    // Reads are started from the coroutine, outside reactions: the hold keeps OnDone away until then.
    AddHold();
    StartRead(&chunk_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    notify([ok](Shared& s) { (ok ? s.chunk_ready : s.reads_done) = true; });
  }

  // The coroutine may end, drop its lease (possibly the last reference to the replica's channel) and let the
  // server destroy its io_context as soon as it sees `done`. So the reactor is destroyed first: its
  // ClientContext, which also references the channel, must not be the one to destroy it here, on a gRPC thread
  // inside the channel's own callback (gRPC 1.51 then frees its callback queue from the thread using it). And
  // the last reference to `shared` (whose timer belongs to the coroutine's io_context) goes to that executor,
  // queued before `done` can be seen.
  void OnDone(const grpc::Status& status) override {
    CallStatus result{static_cast<int>(status.error_code()), status.error_message()};
    std::shared_ptr<Shared> shared = std::move(shared_);
    delete this;
    Shared& s = *shared;
    std::lock_guard lock(s.mutex);
    s.done = true;
    s.status = std::move(result);
    const bool wake = std::exchange(s.parked, false);
    net::post(s.timer.get_executor(), [shared = std::move(shared), wake] {
      if (wake) shared->timer.cancel();
    });
  }

  grpc::ClientContext& context() { return context_; }
  const v1::GenerateChunk& chunk() const { return chunk_; }
  void read_next() { StartRead(&chunk_); }

 private:
  template <typename Update>
  void notify(Update update) {
    bool wake = false;
    {
      std::lock_guard lock(shared_->mutex);
      update(*shared_);
      wake = std::exchange(shared_->parked, false);
    }
    // Only a parked coroutine needs a wake-up; a busy one sees the new state at its next look.
    if (wake) net::post(shared_->timer.get_executor(), [shared = shared_] { shared->timer.cancel(); });
  }

  std::shared_ptr<Shared> shared_;
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateChunk chunk_;  // reused for every message: no allocation per token once warm
};

ReplicaCall::ReplicaCall(ReplicaHandle& replica, const v1::GenerateRequest& request, net::any_io_executor executor,
                           std::chrono::milliseconds max_duration)
    : shared_(std::make_shared<Shared>(std::move(executor))), reactor_(new Reactor(shared_, request, max_duration)) {
  reactor_->start(*replica.channel().stub);
}

ReplicaCall::~ReplicaCall() {
  if (reactor_ != nullptr) {
    reactor_->context().TryCancel();
    std::exchange(reactor_, nullptr)->RemoveHold();
  }
}

net::awaitable<bool> ReplicaCall::park(std::chrono::steady_clock::time_point deadline) {
  boost::system::error_code ec;  // operation_aborted is the wake-up itself
  shared_->timer.expires_at(deadline);
  co_await shared_->timer.async_wait(net::redirect_error(net::use_awaitable, ec));
  co_return ec == net::error::operation_aborted;
}

net::awaitable<ReplicaCall::Event> ReplicaCall::next(std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    if (std::exchange(woken_, false)) co_return Event::kWoken;
    std::optional<Event> event;
    {
      std::lock_guard lock(shared_->mutex);
      if (std::exchange(shared_->chunk_ready, false)) {
        event = Event::kChunk;
      } else if (shared_->reads_done) {
        event = Event::kEnd;
        ended_ = true;
      }
      shared_->parked = !event;
    }
    if (event) co_return *event;
    if (!co_await park(deadline)) {
      std::lock_guard lock(shared_->mutex);
      shared_->parked = false;
      // A chunk that raced the deadline is still delivered: the next look finds it.
      if (!shared_->chunk_ready && !shared_->reads_done) co_return Event::kTimeout;
    }
  }
}

const v1::GenerateChunk& ReplicaCall::chunk() const { return reactor_->chunk(); }

void ReplicaCall::read_next() { reactor_->read_next(); }

void ReplicaCall::wake() {
  woken_ = true;
  shared_->timer.cancel();
}

net::awaitable<CallStatus> ReplicaCall::finish() {
  if (!ended_) reactor_->context().TryCancel();
  // After RemoveHold the reactor may run OnDone (and delete itself) at any moment, even inline.
  std::exchange(reactor_, nullptr)->RemoveHold();
  for (;;) {
    {
      std::lock_guard lock(shared_->mutex);
      if (shared_->done) co_return shared_->status;
      shared_->parked = true;
    }
    co_await park(net::steady_timer::time_point::max());
  }
}

}  // namespace tokenbus::proxy
