//! What simulated callers say: happy, neutral and angry sentences, so that transcripts and
//! sentiment mean something with the simulated AI provider.

use rand::{Rng, seq::IndexedRandom};

pub const HAPPY: &[&str] = &[
    "Thank you so much, you have been wonderful and really helpful today",
    "That is perfect, I am very happy with how quickly this was sorted out",
    "Great service as always, I really appreciate your help",
    "Brilliant, the new plan is exactly what I wanted, thanks a lot",
    "I love how easy this was, you made my day",
    "Excellent, everything works now and I am delighted",
    "You were so kind and patient with me, thank you",
];

pub const NEUTRAL: &[&str] = &[
    "I am calling to update the billing address on my account",
    "Can you tell me when my next invoice is due",
    "I would need the reference number for my last order",
    "Please change the delivery date to next Tuesday",
    "I want to check the status of my application",
    "My customer number is on the letter I received yesterday",
    "Could you read back the address you have on file",
];

pub const ANGRY: &[&str] = &[
    "This is terrible, I have been waiting for an hour and nobody helps me",
    "I am furious, you charged me twice and I want my money back now",
    "Worst service ever, the internet has been broken for a week",
    "I hate this, every time I call I get a different useless answer",
    "This is unacceptable and I am extremely angry about the delay",
    "Your company is a disgrace, cancel my contract immediately",
    "I am sick of these awful problems, nothing ever works",
];

/// A random caller's sentence, as words.
pub fn pick(rng: &mut impl Rng) -> Vec<&'static str> {
    let mood = match rng.random_range(0..3) {
        0 => HAPPY,
        1 => NEUTRAL,
        _ => ANGRY,
    };
    mood.choose(rng)
        .expect("non-empty")
        .split_whitespace()
        .collect()
}

/// The data of packet `sequence` of a call saying `words` in `packets` packets: the words
/// spread evenly over the call, silence (an empty string) in between.
pub fn packet_data(words: &[&'static str], sequence: usize, packets: usize) -> &'static str {
    if words.is_empty() || packets == 0 {
        return "";
    }
    if packets <= words.len() {
        // Fewer packets than words: the last packet carries nothing extra; keep it simple.
        return words.get(sequence).copied().unwrap_or("");
    }
    let spacing = packets / words.len();
    if sequence.is_multiple_of(spacing) {
        words.get(sequence / spacing).copied().unwrap_or("")
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_spread_over_the_call_in_order() {
        let words = ["a", "b", "c"];
        let data: Vec<&str> = (0..7).map(|i| packet_data(&words, i, 7)).collect();
        assert_eq!(data, ["a", "", "b", "", "c", "", ""]);
        let short: Vec<&str> = (0..2).map(|i| packet_data(&words, i, 2)).collect();
        assert_eq!(short, ["a", "b"]);
    }
}
