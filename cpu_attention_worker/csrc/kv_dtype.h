// KV storage dtypes (float32, float16, bfloat16) and their scalar conversion to fp32. The SIMD
// files use only the tags' Raw types; the scalar load() serves the portable kernel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace apex_serve::cpu_attention {

inline float bits_to_float(uint32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
}

// bfloat16 is the top 16 bits of an IEEE fp32.
inline float bf16_to_fp32(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE half -> fp32 without F16C: normals re-bias the exponent (15 -> 127), subnormals are
// mantissa * 2^-24 (exact in fp32), inf and NaN keep their payload.
inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -magnitude : magnitude;
}

// Storage tags: Raw is the element type in the cache, load() widens one element to fp32.
struct Float32 {
    using Raw = float;
    static float load(Raw x) { return x; }
};
struct Float16 {
    using Raw = uint16_t;
    static float load(Raw x) { return fp16_to_fp32(x); }
};
struct BFloat16 {
    using Raw = uint16_t;
    static float load(Raw x) { return bf16_to_fp32(x); }
};

}  // namespace apex_serve::cpu_attention
