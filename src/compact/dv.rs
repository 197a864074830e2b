//! Deletion vectors (Delta protocol, table feature `deletionVectors`): rows of a data file
//! marked as gone without rewriting the file. Compaction writes them inline in the log
//! (storage type `i`): a bucket's vector is small (it is rewritten before a fifth of its rows
//! are marked), and an inline vector needs no file of its own to write, copy or vacuum.
//!
//! Inline format: z85 of (magic 1681511377, little-endian u32; a `RoaringTreemap` in the
//! portable serialization), zero-padded to a multiple of 4 bytes for z85; `sizeInBytes` is the
//! length before padding.

use deltalake::arrow::array::BooleanArray;
use deltalake::kernel::{DeletionVectorDescriptor, StorageType};
use roaring::RoaringTreemap;

const PORTABLE_MAGIC: u32 = 1681511377;

#[derive(Debug, thiserror::Error)]
pub enum DvError {
    #[error("deletion vector stored as {0:?}: only inline vectors are read")]
    NotInline(StorageType),
    #[error("deletion vector is not valid z85")]
    Z85,
    #[error("deletion vector has magic {0}, expected {PORTABLE_MAGIC}")]
    Magic(u32),
    #[error("deletion vector bitmap: {0}")]
    Bitmap(std::io::Error),
    #[error("deletion vector says {said} rows, its bitmap has {has}")]
    Cardinality { said: i64, has: u64 },
    #[error("deletion vector marks row {row} of a {rows}-row file")]
    OutOfRange { row: u64, rows: usize },
}

/// The inline descriptor of `rows` (row positions in the file, from 0).
pub fn encode(rows: &RoaringTreemap) -> DeletionVectorDescriptor {
    let mut bytes = Vec::with_capacity(4 + rows.serialized_size());
    bytes.extend_from_slice(&PORTABLE_MAGIC.to_le_bytes());
    // Writing into a Vec cannot fail.
    let _ = rows.serialize_into(&mut bytes);
    let size = bytes.len();
    bytes.resize(size.next_multiple_of(4), 0);
    DeletionVectorDescriptor {
        storage_type: StorageType::Inline,
        path_or_inline_dv: z85::encode(&bytes),
        offset: None,
        size_in_bytes: size as i32,
        cardinality: rows.len() as i64,
    }
}

/// The row positions an inline descriptor marks.
pub fn decode(dv: &DeletionVectorDescriptor) -> Result<RoaringTreemap, DvError> {
    if dv.storage_type != StorageType::Inline {
        return Err(DvError::NotInline(dv.storage_type));
    }
    let bytes = z85::decode(&dv.path_or_inline_dv).map_err(|_| DvError::Z85)?;
    let magic = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(DvError::Magic(0))?;
    if magic != PORTABLE_MAGIC {
        return Err(DvError::Magic(magic));
    }
    let rows = RoaringTreemap::deserialize_from(&bytes[4..]).map_err(DvError::Bitmap)?;
    if rows.len() as i64 != dv.cardinality {
        return Err(DvError::Cardinality {
            said: dv.cardinality,
            has: rows.len(),
        });
    }
    Ok(rows)
}

/// Which of a file's `rows` rows are still there: `false` at every position `dv` marks.
pub fn live_mask(dv: &RoaringTreemap, rows: usize) -> Result<BooleanArray, DvError> {
    if let Some(max) = dv.max() {
        if max >= rows as u64 {
            return Err(DvError::OutOfRange { row: max, rows });
        }
    }
    let mut live = vec![true; rows];
    for r in dv.iter() {
        live[r as usize] = false;
    }
    Ok(BooleanArray::from(live))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_vectors_round_trip_and_bad_ones_are_refused() {
        for rows in [
            vec![],
            vec![0u64],
            vec![1, 2, 3, 70_000, 1 << 33],
            (0..5000).map(|i| i * 3).collect(),
        ] {
            let map: RoaringTreemap = rows.iter().copied().collect();
            let dv = encode(&map);
            assert_eq!(dv.cardinality, rows.len() as i64);
            assert_eq!(dv.path_or_inline_dv.len() % 5, 0);
            assert_eq!(decode(&dv).unwrap(), map);
        }
        let mut dv = encode(&[5u64, 9].into_iter().collect());
        dv.cardinality = 3;
        assert!(matches!(decode(&dv), Err(DvError::Cardinality { .. })));
        dv.storage_type = StorageType::UuidRelativePath;
        assert!(matches!(decode(&dv), Err(DvError::NotInline(_))));
        let map: RoaringTreemap = [1u64, 4].into_iter().collect();
        let live = live_mask(&map, 5).unwrap();
        assert_eq!(
            live.iter().map(|v| v.unwrap()).collect::<Vec<_>>(),
            vec![true, false, true, true, false]
        );
        assert!(matches!(
            live_mask(&map, 4),
            Err(DvError::OutOfRange { row: 4, rows: 4 })
        ));
    }
}
