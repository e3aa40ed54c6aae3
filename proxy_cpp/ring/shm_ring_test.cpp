// The ring against its contract: framing across the end, a full ring, the wake-up protocol, two threads
// at full speed, and a producer process that dies. A lost wake-up shows as a hang (the ctest timeout), never
// as a timing assertion.
#include "ring/shm_ring.hpp"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <random>
#include <thread>
#include <vector>

namespace tokenbus::ring {
namespace {

using namespace std::chrono_literals;
constexpr auto kForever = std::chrono::hours(1);  // a lost wake-up hangs the test instead of passing late

// The test's own view of the header words, by their contract offsets.
class RawHeader {
 public:
  explicit RawHeader(int mem_fd) {
    base_ = ::mmap(nullptr, kHeaderSize, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    EXPECT_NE(base_, MAP_FAILED);
  }
  ~RawHeader() { ::munmap(base_, kHeaderSize); }
  template <class T>
  std::atomic_ref<T> word(std::size_t offset) {
    return std::atomic_ref<T>(*reinterpret_cast<T*>(static_cast<char*>(base_) + offset));
  }
  std::uint32_t consumer_waiting() { return word<std::uint32_t>(128).load(); }
  std::uint32_t producer_waiting() { return word<std::uint32_t>(132).load(); }

 private:
  void* base_;
};

bool readable(int fd) {
  pollfd pfd{fd, POLLIN, 0};
  return ::poll(&pfd, 1, 0) == 1;
}

template <class Predicate>
bool eventually(Predicate predicate) {
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!predicate()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

// Payload of record `seq`: its size and bytes are a function of seq, so the reader can check both.
std::vector<std::byte> payload_for(std::uint64_t seq, std::size_t max_size) {
  std::mt19937_64 rng(seq);
  std::vector<std::byte> bytes(rng() % (max_size + 1));
  for (auto& b : bytes) b = static_cast<std::byte>(rng());
  return bytes;
}

bool same(std::span<const std::byte> got, const std::vector<std::byte>& want) {
  return got.size() == want.size() && (want.empty() || std::memcmp(got.data(), want.data(), want.size()) == 0);
}

TEST(ParseRingFds, AcceptsThreeIntegers) {
  const auto fds = parse_ring_fds("3,4,5");
  ASSERT_TRUE(fds);
  EXPECT_EQ(fds->mem_fd, 3);
  EXPECT_EQ(fds->data_fd, 4);
  EXPECT_EQ(fds->space_fd, 5);
}

TEST(ParseRingFds, RejectsAnythingElse) {
  for (const char* bad : {"", "3,4", "3,4,5,6", "3,,5", "a,4,5", "3,4,5 ", "-1,4,5", "3;4;5", "99999999999,1,2"}) {
    std::string error;
    EXPECT_FALSE(parse_ring_fds(bad, &error)) << bad;
    EXPECT_NE(error.find("MEM,DATA,SPACE"), std::string::npos) << bad;
  }
}

TEST(Region, RejectsASizeThatIsNotAPowerOfTwo) {
  const int fd = ::memfd_create("bad-ring", MFD_CLOEXEC);
  ASSERT_EQ(::ftruncate(fd, kHeaderSize + 5000), 0);
  try {
    Region region(fd);
    ADD_FAILURE() << "mapped a 5000-byte ring";
  } catch (const RingError& e) {
    EXPECT_NE(std::string(e.what()).find("power of two"), std::string::npos) << e.what();
  }
  ::close(fd);
}

TEST(Endpoint, RejectsADescriptorThatIsNotAnEventfd) {
  OwnedRingFds ring(4096);
  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  RingFds fds = ring.fds();
  fds.data_fd = pipe_fds[0];
  EXPECT_THROW(Consumer consumer(fds), RingError);
  ::close(pipe_fds[0]);
  ::close(pipe_fds[1]);
}

TEST(Ring, RecordsOfVaryingSizesCrossTheEndIntact) {
  OwnedRingFds ring(4096);
  Producer producer(ring.fds());
  Consumer consumer(ring.fds());
  ASSERT_EQ(producer.region().max_payload(), 1024u);
  std::uint64_t written = 0;
  std::uint64_t read = 0;
  std::uint64_t bytes = 0;
  while (read < 5000) {
    // Write until full, then read a few: the fill level wanders, so records start at every offset.
    while (producer.try_write(payload_for(written, 1024))) {
      bytes += payload_for(written, 1024).size();
      ++written;
    }
    EXPECT_TRUE(producer.fits(payload_for(written, 1024).size()));
    for (int i = 0; i < 3 && read < written; ++i, ++read) {
      const auto record = consumer.peek();
      ASSERT_TRUE(record) << "record " << read;
      ASSERT_TRUE(same(*record, payload_for(read, 1024))) << "record " << read;
      consumer.release();
    }
  }
  EXPECT_GT(bytes, 100u * 4096u);  // the ring went round many times
  while (read < written) {
    const auto record = consumer.peek();
    ASSERT_TRUE(record);
    ASSERT_TRUE(same(*record, payload_for(read++, 1024)));
    consumer.release();
  }
  EXPECT_FALSE(consumer.peek());
  EXPECT_TRUE(consumer.broken().empty());
}

TEST(Ring, ARecordThatDoesNotFitBeforeTheEndStartsAtZero) {
  OwnedRingFds ring(4096);
  Producer producer(ring.fds());
  Consumer consumer(ring.fds());
  const std::vector<std::byte> filler(1016, std::byte{1});  // 1024 ring bytes each
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(producer.try_write(filler));
    ASSERT_TRUE(consumer.peek());
    consumer.release();
  }
  // 1024 bytes left before the end; this record needs 1032: skip marker, then offset 0.
  const std::vector<std::byte> big(1024, std::byte{7});
  ASSERT_TRUE(producer.try_write(big));
  RawHeader raw(ring.fds().mem_fd);
  EXPECT_EQ(raw.word<std::uint64_t>(0).load(), 3072u + 1024u + 1032u);
  const auto record = consumer.peek();
  ASSERT_TRUE(record);
  EXPECT_TRUE(same(*record, big));
  EXPECT_EQ(static_cast<const void*>(record->data()), static_cast<const void*>(consumer.region().data() + 4));
}

TEST(Ring, ARecordLargerThanAQuarterIsRefusedButTheRingStillWorks) {
  OwnedRingFds ring(4096);
  Producer producer(ring.fds());
  Consumer consumer(ring.fds());
  const std::vector<std::byte> too_big(1025);
  EXPECT_FALSE(producer.fits(too_big.size()));
  EXPECT_FALSE(producer.try_write(too_big));
  EXPECT_FALSE(consumer.peek());
  const std::vector<std::byte> ok(1024, std::byte{3});
  EXPECT_TRUE(producer.try_write(ok));
  EXPECT_TRUE(same(*consumer.peek(), ok));
}

TEST(Ring, AFullRingRefusesThenTheProducerWakesWhenTheConsumerReleases) {
  OwnedRingFds ring(4096);
  Producer producer(ring.fds());
  Consumer consumer(ring.fds());
  RawHeader raw(ring.fds().mem_fd);
  const std::vector<std::byte> record(1016, std::byte{9});  // 1024 ring bytes: four fill the ring
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(producer.try_write(record));
  EXPECT_FALSE(producer.try_write(record));
  EXPECT_TRUE(producer.fits(record.size()));  // full, not too big

  auto waited = std::async(std::launch::async, [&] { return producer.wait_for_space(kForever); });
  ASSERT_TRUE(eventually([&] { return raw.producer_waiting() == 1; }));  // asleep on space_fd
  ASSERT_TRUE(consumer.peek());
  consumer.release();
  EXPECT_EQ(waited.get(), WaitResult::kReady);
  EXPECT_EQ(raw.producer_waiting(), 0u);
  EXPECT_TRUE(producer.try_write(record));
  EXPECT_FALSE(producer.try_write(record));
}

TEST(Ring, ReleaseSignalsSpaceFdOnlyWhenTheProducerAnnouncedItsSleep) {
  OwnedRingFds ring(4096);
  Producer producer(ring.fds());
  Consumer consumer(ring.fds());
  const std::vector<std::byte> record(1016);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(producer.try_write(record));
  ASSERT_TRUE(consumer.peek());
  consumer.release();  // nobody waits: no wake-up
  EXPECT_FALSE(readable(ring.fds().space_fd));

  ASSERT_TRUE(producer.try_write(record));
  ASSERT_FALSE(producer.try_write(record));
  ASSERT_TRUE(producer.prepare_wait());
  ASSERT_TRUE(consumer.peek());
  consumer.release();
  EXPECT_TRUE(readable(ring.fds().space_fd));
  EXPECT_FALSE(producer.prepare_wait());  // room now: do not sleep
}

TEST(Ring, TheConsumerWakesViaDataFd) {
  OwnedRingFds ring(4096);
  Producer producer(ring.fds());
  Consumer consumer(ring.fds());
  RawHeader raw(ring.fds().mem_fd);
  const std::vector<std::byte> record(10, std::byte{5});

  ASSERT_TRUE(producer.try_write(record));  // nobody waits: no wake-up
  EXPECT_FALSE(readable(ring.fds().data_fd));
  EXPECT_FALSE(consumer.prepare_wait());  // not empty
  ASSERT_TRUE(consumer.peek());
  consumer.release();

  auto waited = std::async(std::launch::async, [&] { return consumer.wait_for_data(kForever); });
  ASSERT_TRUE(eventually([&] { return raw.consumer_waiting() == 1; }));  // asleep on data_fd
  ASSERT_TRUE(producer.try_write(record));
  EXPECT_EQ(waited.get(), WaitResult::kReady);
  EXPECT_EQ(raw.consumer_waiting(), 0u);
  EXPECT_TRUE(same(*consumer.peek(), record));
}

TEST(Ring, AWaitWithNothingComingTimesOutWhileThePeerLives) {
  OwnedRingFds ring(4096);
  Producer producer(ring.fds());
  Consumer consumer(ring.fds());
  RawHeader raw(ring.fds().mem_fd);
  EXPECT_EQ(consumer.wait_for_data(1ms), WaitResult::kTimeout);
  EXPECT_EQ(raw.consumer_waiting(), 0u);  // announcement withdrawn
  EXPECT_TRUE(consumer.peer_alive());
}

TEST(Ring, TwoThreadsStreamRecordsIntact) {
  OwnedRingFds ring(4096);
  Producer producer(ring.fds());
  Consumer consumer(ring.fds());
  constexpr std::uint64_t kRecords = 200000;
  std::thread writer([&] {
    for (std::uint64_t seq = 0; seq < kRecords; ++seq) {
      const auto payload = payload_for(seq, 300);
      while (!producer.try_write(payload)) ASSERT_NE(producer.wait_for_space(kForever), WaitResult::kPeerGone);
    }
  });
  std::uint64_t mismatches = 0;
  for (std::uint64_t seq = 0; seq < kRecords; ++seq) {
    auto record = consumer.peek();
    while (!record) {
      ASSERT_EQ(consumer.wait_for_data(kForever), WaitResult::kReady);
      record = consumer.peek();
    }
    if (!same(*record, payload_for(seq, 300))) ++mismatches;
    consumer.release();
  }
  writer.join();
  EXPECT_EQ(mismatches, 0u);
  EXPECT_FALSE(consumer.peek());
}

TEST(Ring, AnImpossibleLengthBreaksTheRingWithAMessage) {
  OwnedRingFds ring(4096);
  Consumer consumer(ring.fds());
  RawHeader raw(ring.fds().mem_fd);
  const std::uint32_t bogus = 0x7FFFFFFF;
  void* data = ::mmap(nullptr, kHeaderSize + 4096, PROT_READ | PROT_WRITE, MAP_SHARED, ring.fds().mem_fd, 0);
  ASSERT_NE(data, MAP_FAILED);
  std::memcpy(static_cast<char*>(data) + kHeaderSize, &bogus, sizeof(bogus));
  raw.word<std::uint64_t>(0).store(8);
  EXPECT_FALSE(consumer.peek());
  EXPECT_NE(consumer.broken().find("impossible"), std::string::npos) << consumer.broken();
  ::munmap(data, kHeaderSize + 4096);
}

TEST(Ring, AProducerProcessThatDiesIsNoticedAfterItsRecordsAreRead) {
  OwnedRingFds ring(4096);
  Consumer consumer(ring.fds());
  EXPECT_TRUE(consumer.peer_alive());  // nobody attached yet
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    Producer producer(ring.fds());
    const char last[] = "last words";
    producer.try_write(last, sizeof(last));
    ::_exit(0);
  }
  // Wait for the child's exit without reaping it: a zombie must count as gone too.
  siginfo_t info{};
  ASSERT_EQ(::waitid(P_PID, static_cast<id_t>(child), &info, WEXITED | WNOWAIT), 0);
  EXPECT_FALSE(consumer.peer_alive());
  EXPECT_EQ(consumer.wait_for_data(50ms), WaitResult::kReady);  // what it wrote is still delivered
  const auto record = consumer.peek();
  ASSERT_TRUE(record);
  EXPECT_STREQ(reinterpret_cast<const char*>(record->data()), "last words");
  consumer.release();
  EXPECT_EQ(consumer.wait_for_data(50ms), WaitResult::kPeerGone);
  ASSERT_EQ(::waitpid(child, nullptr, 0), child);
  EXPECT_EQ(consumer.wait_for_data(50ms), WaitResult::kPeerGone);
}

}  // namespace
}  // namespace tokenbus::ring
