//! Sealed-record decoding: any bytes, under any associated data, either
//! open (only if they were sealed so) or fail; sealing round-trips.
#![no_main]

use keyhole::crypto::MasterKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = MasterKey::from_bytes(&[7u8; 32]).expect("a 32-byte key");
    let sealer = key.sealer();
    let cut = data.first().map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let (aad, record) = data.split_at(cut);
    assert!(sealer.open(record, aad).is_err(), "unsealed bytes opened");
    let sealed = sealer.seal(record, aad).expect("seal");
    assert_eq!(sealer.open(&sealed, aad).expect("open").expose(), record);
    let mut flipped = sealed.clone();
    let i = usize::from(data.last().copied().unwrap_or(0)) % flipped.len();
    flipped[i] ^= 1;
    assert!(sealer.open(&flipped, aad).is_err(), "a flipped bit was not caught");
});
