#pragma once
// The routing snapshot (schemas/README.md section 2) as plain structs, and its MessagePack codec.
// Deliberately free of Asio and gRPC so that anything (the proxy, tests, tools) can include it cheaply.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tokenbus {

// Bus message kinds this module speaks (schemas/messages.py Kind).
inline constexpr std::uint8_t kKindSnapshot = 0x10;
inline constexpr std::uint8_t kKindSnapshotRequest = 0x11;
inline constexpr std::int64_t kWireVersion = 1;
// Any bus payload larger than this is refused unread (schemas/messages.py MAX_PAYLOAD_BYTES).
inline constexpr std::size_t kMaxBusPayloadBytes = 4 * 1024 * 1024;

enum class ReplicaState { kReady, kDraining };

struct ReplicaLoad {
  std::int64_t running = 0;
  std::int64_t waiting = 0;
  double kv_usage = 0.0;
};

// Field order is the wire order.
struct SnapshotReplica {
  std::string id;
  std::string node;
  std::string addr;  // "host:port" of the replica's gRPC server
  ReplicaState state = ReplicaState::kReady;
  std::int64_t max_concurrency = 0;
  ReplicaLoad load;
  bool healthy = false;

  // A replica new requests may be sent to.
  bool routable() const { return state == ReplicaState::kReady && healthy; }
};

// Field order is the wire order: the deployment's settings, then its replicas.
struct Deployment {
  std::string name;
  std::int64_t max_model_len = 0;       // context length in tokens; 0 = unknown
  double first_token_timeout_s = 0.0;   // 0 = no limit
  double idle_timeout_s = 0.0;          // longest gap between chunks of a started stream; 0 = no limit
  std::vector<SnapshotReplica> replicas;
};

struct Snapshot {
  std::string head_id;  // the publishing head's incarnation: new at every head start
  std::uint64_t epoch = 0;
  std::uint64_t version = 0;  // epoch << 32 | seq
  std::vector<Deployment> deployments;  // wire order, kept so that encode() round-trips byte for byte

  const Deployment* find(std::string_view name) const;
};

inline std::uint64_t version_epoch(std::uint64_t version) { return version >> 32; }

// Decodes a SNAPSHOT payload (frame 2). On any malformed input returns nullopt and says why in `error`;
// never throws.
std::optional<Snapshot> decode_snapshot(std::string_view payload, std::string& error);

// Encodes a snapshot as the head does: "v" first, then the fields in wire order.
std::string encode_snapshot(const Snapshot& snapshot);

// Encodes a SNAPSHOT_REQUEST payload: {"v": 1, "have_version": N}.
std::string encode_snapshot_request(std::uint64_t have_version);

}  // namespace tokenbus
