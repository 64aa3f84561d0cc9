//! Sentiment of a transcript, computed locally with VADER (a lexicon- and rule-based analyser
//! tuned for conversational text), through the `vader_sentiment` crate.

use common::events::Sentiment;

/// VADER's customary thresholds on the compound score.
const POSITIVE_FROM: f64 = 0.05;
const NEGATIVE_TO: f64 = -0.05;

pub fn analyse(text: &str) -> Sentiment {
    let analyzer = vader_sentiment::SentimentIntensityAnalyzer::new();
    let score = analyzer
        .polarity_scores(text)
        .get("compound")
        .copied()
        .unwrap_or(0.0)
        .clamp(-1.0, 1.0);
    let label = if score >= POSITIVE_FROM {
        "positive"
    } else if score <= NEGATIVE_TO {
        "negative"
    } else {
        "neutral"
    };
    Sentiment {
        label: label.to_owned(),
        score,
    }
}

#[cfg(test)]
mod tests {
    use super::analyse;

    #[test]
    fn tells_happy_angry_and_flat_callers_apart() {
        let happy = analyse("Thank you so much, this was wonderful and really helpful!");
        assert_eq!(happy.label, "positive");
        assert!(happy.score > 0.5);
        let angry =
            analyse("This is terrible. I am furious and I hate waiting, worst service ever.");
        assert_eq!(angry.label, "negative");
        assert!(angry.score < -0.5);
        let flat = analyse("I need to update my billing address.");
        assert_eq!(flat.label, "neutral");
        assert_eq!(analyse("").label, "neutral");
    }
}
