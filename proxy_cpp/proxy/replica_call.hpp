#pragma once
// The bridge between one gRPC Generate call (callback API, chunks arriving on gRPC's threads) and the
// connection coroutine that streams them to the client (on an Asio I/O thread). The coroutine never
// blocks: it parks on a timer that the reactor cancels (by a post to the coroutine's executor) when it has
// something new. One chunk at a time: the next read is issued only once the coroutine has taken the last
// chunk, so a slow client slows the replica down instead of growing a buffer here.
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs it under g++ 12

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <memory>
#include <string>

#include "tokenbus.pb.h"

namespace tokenbus::proxy {

class ReplicaHandle;

// How a call ended: the gRPC status code (0 is OK) and its message.
struct CallStatus {
  int code = 0;
  std::string message;
  bool ok() const { return code == 0; }
};

class ReplicaCall {
 public:
  enum class Event {
    kChunk,  // chunk() holds a new message
    kEnd,    // the stream has ended (finish() gives the status)
    kWoken,  // wake() was called
    kTimeout,  // the deadline given to next() passed first
  };

  // Starts the call on `replica`'s channel with a gRPC deadline `max_duration` from now; events are
  // delivered on `executor` (the connection's thread). The request is copied: a retry sends it again.
  ReplicaCall(ReplicaHandle& replica, const v1::GenerateRequest& request, boost::asio::any_io_executor executor,
               std::chrono::milliseconds max_duration);
  // Cancels the call if finish() was not awaited (the coroutine was torn down early).
  ~ReplicaCall();
  ReplicaCall(const ReplicaCall&) = delete;
  ReplicaCall& operator=(const ReplicaCall&) = delete;

  // Waits for the next event until `deadline`. After kChunk, read chunk() and then call read_next().
  boost::asio::awaitable<Event> next(std::chrono::steady_clock::time_point deadline);
  const v1::GenerateChunk& chunk() const;
  // Asks for the message after chunk(); chunk() must not be used afterwards.
  void read_next();
  // Wakes a pending next() with kWoken. Call on the executor's thread.
  void wake();
  // Ends the call: cancels it unless the stream already ended (the cancellation reaches the replica and
  // its engine), then waits for the final status. Await exactly once.
  boost::asio::awaitable<CallStatus> finish();

 private:
  struct Shared;
  class Reactor;
  // Parks until the reactor or wake() signals, or `deadline` passes (then returns false). Call with nothing
  // locked.
  boost::asio::awaitable<bool> park(std::chrono::steady_clock::time_point deadline);

  std::shared_ptr<Shared> shared_;
  Reactor* reactor_;  // deletes itself in OnDone; ours to use until finish() releases the hold
  bool ended_ = false;
  bool woken_ = false;
};

}  // namespace tokenbus::proxy
